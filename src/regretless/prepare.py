"""Built-in models that need work before first use, done above the trainer (this module may import it).

`regretless.models` loads models and never trains: a built-in that must be *built by training* (`tiny-base`,
pretrained by `regretless.pretrain`, which runs the SFT trainer) is built here, at the layer of the commands and
the sweep, before anything loads it. `smollm2-135m` needs only a conversion (`regretless.assets`), which the
model loader does itself.

    from regretless.prepare import prepare_model
    path = prepare_model("tiny-base")        # built once into the cache, then a plain HF folder
    ensure_model(cfg.model)                  # the same for built-in names; anything else is left to the loader
"""

from __future__ import annotations

from pathlib import Path

from regretless import assets


def prepare_model(name: str, quiet: bool = False) -> Path:
    """The folder of the built-in model `name`, built (tiny-base: pretrained) or converted once if needed."""
    if name == "tiny-base":
        from regretless import pretrain

        return pretrain.prepare(assets.model_dir(name), quiet)  # rebuilds an older version's build
    return assets.prepare(name, quiet)


def resolve_or_build(name: str, quiet: bool = False) -> Path:
    """`regretless.models.resolve_model`, after building `name` when it is a built-in made by training."""
    from regretless.models import resolve_model

    ensure_model(name, quiet)
    return resolve_model(name, quiet)


def ensure_model(name: str, quiet: bool = False) -> None:
    """Build `name` first when it is a built-in that the model loader cannot prepare by itself."""
    if name in assets.BUILT_BY_TRAINING:
        prepare_model(name, quiet)
