"""prinmix: store, ship and serve fine-tunes as PrinMix-compressed deltas on a shared base model.

    import prinmix
    prinmix.compress(base_dir, finetuned_dir, "ft.delta", ratio="1/16")
    prinmix.merge(base_dir, "ft.delta", "merged/")
    delta = prinmix.load_delta("ft.delta")
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import prinmix` stays cheap, torch/transformers load on first use
    if name in ("compress", "merge", "load_delta", "info", "CompressSummary"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'prinmix' has no attribute {name!r}")


__all__ = ["compress", "merge", "load_delta", "info", "CompressSummary", "__version__"]
