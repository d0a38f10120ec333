"""prinmix: store, ship and serve fine-tunes as PrinMix-compressed deltas on a shared base model.

    import prinmix
    prinmix.compress(base_dir, finetuned_dir, "ft.delta", ratio="1/16")
    prinmix.merge(base_dir, "ft.delta", "merged/")
    delta = prinmix.load_delta("ft.delta")
    prinmix.apply_delta(model, "ft.delta")          # an in-memory transformers model, merged in place
    mt = prinmix.load_with_deltas(base_dir, ["a.delta", "b.delta"])   # several fine-tunes, one base
"""

__version__ = "0.1.0"


_LAZY = {"compress": "api", "merge": "api", "load_delta": "api", "info": "api", "CompressSummary": "api",
         "apply_delta": "in_memory", "load_with_deltas": "in_memory"}


def __getattr__(name):  # lazy: `import prinmix` stays cheap, torch/transformers load on first use
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prinmix' has no attribute {name!r}")


__all__ = ["compress", "merge", "load_delta", "info", "CompressSummary", "apply_delta", "load_with_deltas",
           "__version__"]
