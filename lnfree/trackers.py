"""The experiment trackers of `lnfree.remove --log-with` (Accelerate's wandb and tensorboard trackers).

A requested tracker that is not installed is one sentence before anything loads (Accelerate would skip it
without a word). W&B without an API key logs offline under the run's directory and says how to upload it
later, instead of asking for a key in the middle of a run.
"""

from __future__ import annotations

import os

from lnfree.config import UserError


def wandb_key() -> bool:
    """Whether W&B has a key: WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """Log W&B offline: asked for with WANDB_MODE, or no key and no mode asked for."""
    mode = os.environ.get("WANDB_MODE")
    return mode in ("offline", "dryrun") or (mode is None and not wandb_key())


def check(name: str | None) -> None:
    """A tracker that cannot start is one sentence, before anything loads."""
    if name is None:
        return
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    extra = "`pip install -e '.[track]'` (or `pip install {}`), or drop --log-with."
    if name == "tensorboard" and not is_tensorboard_available():
        raise UserError("--log-with tensorboard needs the tensorboard package: " + extra.format("tensorboard"))
    if name == "wandb":
        if not is_wandb_available():
            raise UserError("--log-with wandb needs the wandb package: " + extra.format("wandb"))
        if os.environ.get("WANDB_MODE") == "online" and not wandb_key():
            raise UserError("WANDB_MODE=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY (unset "
                            "WANDB_MODE to log offline).")


def start(run) -> None:
    """Start the run's tracker (every process calls this; Accelerate starts it on the main one)."""
    from lnfree.trainer import note

    cfg = run.cfg
    if not cfg.log_with:
        return
    kwargs = {}
    if cfg.log_with == "wandb":  # its files beside the run's, not in the working directory
        kwargs = {"wandb": {"dir": cfg.output_dir, **({"mode": "offline"} if wandb_offline() else {})}}
    try:
        run.acc.init_trackers("lnfree", config={k: v for k, v in cfg.recipe.items() if v is not None},
                              init_kwargs=kwargs)
    except Exception as err:  # wandb and tensorboard raise their own types
        raise UserError(f"--log-with {cfg.log_with} could not start ({type(err).__name__}); fix its setup or "
                        f"drop --log-with.") from None
    if cfg.log_with == "wandb" and run.acc.is_main_process and wandb_offline():
        note(f"note: W&B logs offline (no API key, or WANDB_MODE) to {sync_dir(run)}")


def sync_dir(run) -> str:
    return run.acc.get_tracker("wandb", unwrap=True).settings.sync_dir


def finish(run) -> None:
    """End the tracker; an offline W&B run is told how to upload."""
    from lnfree.trainer import note

    if not run.cfg.log_with:
        return
    where = sync_dir(run) if run.cfg.log_with == "wandb" and run.acc.is_main_process and wandb_offline() else None
    run.acc.end_training()
    if where:
        note(f"note: upload the W&B run with `wandb sync {where}`")
