"""prinmix: store, ship and serve fine-tunes as PrinMix-compressed deltas on a shared base model.

    import prinmix
    prinmix.compress(base_dir, finetuned_dir, "ft.delta", ratio="1/16")
    prinmix.merge(base_dir, "ft.delta", "merged/")
    delta = prinmix.load_delta("ft.delta")
    prinmix.apply_delta(model, "ft.delta")          # an in-memory transformers model, merged in place
    mt = prinmix.load_with_deltas(base_dir, ["a.delta", "b.delta"])   # several fine-tunes, one base
"""

__version__ = "0.1.0"

_API_NAMES = ("compress", "merge", "load_delta", "info", "CompressSummary", "CalibrationConfig", "PrinMixConfig",
              "DeltaInfo", "EvalConfig", "ReportOptions", "apply_delta", "load_with_deltas", "evaluate_deltas", "report",
              "export_lora")


def __getattr__(name):  # lazy (the optional-import exception): `import prinmix` stays cheap, torch loads on first use
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'prinmix' has no attribute {name!r}")


__all__ = [*_API_NAMES, "__version__"]
