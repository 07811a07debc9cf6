"""The removal training loop: steps, checkpoints, recovery from divergence, export and the run report.

Resume restores the newest checkpoint that loads (a damaged one is set aside, and
said so); SIGINT/SIGTERM stop at the end of a step with a checkpoint; the trained
weights are checkpointed before the export, so a failed export loses nothing.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lnfree import checkpoint as ckpt
from lnfree import signals, trackers
from lnfree.config import (
    MAX_RECOVERIES,
    RUN_CONFIG,
    Diverged,
    Interrupted,
    RunConfig,
    UserError,
    save_run_config,
)
from lnfree.fake_ln import convert_to_fake, fake_norms, find_fakes
from lnfree.files import append_line, remove_tree, write_atomic, writing
from lnfree.run import Run, heldout_ce, load_base

EXPORT_TOL = 1e-4


def note(message: str) -> None:
    """A line for the user on stderr (stdout keeps the summary table), clear of the progress bar."""
    tqdm.write(message, file=sys.stderr)


def _truncate_metrics(path: Path, step: int) -> int:
    """Drop lines written after checkpoint `step` by a killed run, and unreadable ones (a kill or a full
    disk in the middle of an append); returns how many were unreadable."""
    if not path.exists():
        return 0
    keep, bad = [], 0
    for line in filter(str.strip, path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        at = row.get("step", 0) if isinstance(row, dict) else None
        if isinstance(at, int) and at <= step:
            keep.append(line)
    write_atomic(path, "".join(ln + "\n" for ln in keep))
    return bad


def _restore_newest(run: Run, found: list[Path]) -> tuple[Path, list[tuple[Path, str]]]:
    """Restore the newest checkpoint that loads; returns it, and the newer ones skipped with the reason."""
    skipped = []
    for path in reversed(found):
        why = ckpt.problem(path)
        if why is None:
            try:
                run.restore(path, resume=True)
                return path, skipped
            except Exception as err:  # damage the file checks cannot see: try the checkpoint before
                why = f"it does not load ({type(err).__name__})"
        skipped.append((path, why))
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise UserError(f"No checkpoint in {run.ckpt_root} can be resumed from ({reasons}); move them away to "
                    f"restart the run from step 0 with --resume.")


def _set_aside(skipped: list[tuple[Path, str]]) -> None:
    """Rename damaged checkpoints out of the way, so that no later resume or rollback picks them."""
    for path, why in skipped:
        aside = path.with_name(f"skipped-{path.name}")
        remove_tree(aside)
        os.replace(path, aside)
        note(f"note: skipped {path.name}: {why}; moved it to {aside}")


def _resume(run: Run, metrics_path: Path) -> None:
    """Continue from the newest loadable checkpoint (or from step 0 when none was written)."""
    found = ckpt.checkpoints(run.ckpt_root)
    strays = ckpt.strays(run.ckpt_root)
    path, skipped = _restore_newest(run, found) if found else (None, [])
    if run.step > run.cfg.max_steps:
        raise UserError(f"Checkpoint {path.name} is at step {run.step}, past the run's {run.cfg.max_steps} steps; "
                        f"resume with --max-steps {run.step} or more.")
    if not run.acc.is_main_process:
        return
    for p in strays:
        note(f"note: ignored {p} (not a checkpoint written by lnfree.remove)")
    _set_aside(skipped)
    bad = _truncate_metrics(metrics_path, run.step)
    if bad:
        note(f"note: dropped {bad} unreadable line(s) of {metrics_path} (a write cut short)")
    note(f"resumed from {path.name} ({run.removed()} LNs removed)" if path else
               "no checkpoint was written yet: starting from step 0")


def train(cfg: RunConfig, resume: bool = False) -> dict:
    start_time = time.time()
    out = Path(cfg.output_dir)
    if resume and (out / "run.json").exists():
        raise UserError(f"The run in {out} is already finished; see {out / 'run.json'}.")
    resuming = resume and bool(ckpt.checkpoints(out / "checkpoints"))
    run = Run(cfg, eval_initial=not resuming)
    run.t0 = start_time  # this segment's setup counts too
    acc = run.acc
    metrics_path = out / "metrics.jsonl"
    if resume:
        _resume(run, metrics_path)
    # Before run_config.json: a tracker that cannot start leaves no run behind.
    trackers.start(run)
    if acc.is_main_process:
        save_run_config(cfg)
    acc.wait_for_everyone()
    initial_ce = run.initial_ce
    if run.step == 0 and cfg.auto_recover:
        run.save()  # a rollback target before the first real checkpoint
    with signals.deferred():
        _loop(run, metrics_path)
        summary = finish(run, initial_ce)
    if signals.pending() is not None:
        note("note: the run had finished when the interrupt came")
    acc.wait_for_everyone()
    return summary


def _loop(run: Run, metrics_path: Path) -> None:
    cfg, acc = run.cfg, run.acc
    bar = tqdm(total=cfg.last_step, initial=run.step, disable=not acc.is_main_process, desc="removing LN"
               if not cfg.keep_ln else "fine-tuning", dynamic_ncols=True)
    try:  # closed before any message below it, so that the message is the last line
        _steps(run, metrics_path, bar)
    finally:
        bar.close()
    trackers.finish(run)


def _steps(run: Run, metrics_path: Path, bar) -> None:
    cfg, acc = run.cfg, run.acc
    n_fakes = len(run.fake_modules())
    t_last = time.time()
    while run.step < cfg.last_step:
        step = run.step + 1
        m, gone, bad = run.advance(step)
        if bad:
            _handle_divergence(run, step, bad)
            bar.set_description("removing LN (recovered)")
            bar.n = run.step
            bar.refresh()
            continue
        now = time.time()
        rate = run.r.tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        removed = run.removed()
        row = {"step": step, **m, "lr": run.sched_lr.get_last_lr()[0],
               "tokens": run.tokens, "tok_per_s": round(rate, 1), "lns_removed": removed}
        if gone:
            row["removed_now"] = gone
        if acc.is_main_process:
            append_line(metrics_path, json.dumps(row))
            bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}", aux=f"{m['aux']:.3g}",
                            gnorm=f"{m['grad_norm']:.2f}", tok_s=f"{rate:,.0f}", ln=f"{removed}/{n_fakes}")
            bar.update(1)
        if cfg.log_with:
            acc.log(row, step=step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.last_step:
            run.save()
        if run.any_process(signals.pending() is not None):
            _stop(run)


def _stop(run: Run) -> None:
    """SIGINT or SIGTERM came during the step just done: checkpoint it and stop."""
    if run.saved_step != run.step:
        run.save()
    raise Interrupted(f"interrupted at step {run.step}; checkpoint step-{run.step:06d} is written; continue with "
                      f"`python -m lnfree.remove --output-dir {shlex.quote(str(run.out))} --resume`")


def _handle_divergence(run: Run, step: int, why: str) -> None:
    previous = ckpt.checkpoints(run.ckpt_root)
    where = f"the last good checkpoint is {previous[-1]}" if previous else "no checkpoint was written yet"
    if not run.cfg.auto_recover or run.recoveries >= MAX_RECOVERIES or not previous:
        command = (f"python -m lnfree.remove --output-dir {shlex.quote(str(run.out))} --resume "
                   f"--lr {run.r.lr / 2:g}")
        raise Diverged(f"step {step}: {why}; {where}; continue at half the LR with `{command}`, or add "
                       f"--auto-recover to that command.")
    scale = run.lr_scale * 0.5
    recoveries = run.recoveries + 1
    run.restore(previous[-1])
    run.recoveries = recoveries
    run.set_lr_scale(scale)
    msg = (f"step {step}: {why}; rolled back to {previous[-1].name} and continuing with LR x{scale:g} "
           f"(recovery {recoveries}/{MAX_RECOVERIES})")
    if run.acc.is_main_process:
        note(msg)
        append_line(run.out / "metrics.jsonl", json.dumps({"step": run.step, "event": "rollback", "message": msg}))


# ------------------------------------------------------------------------------------------------ finish


def finish(run: Run, initial_ce: float | None) -> dict:
    from lnfree import export, report

    cfg, acc, out = run.cfg, run.acc, run.out
    if run.saved_step != run.step:
        run.save()  # the trained weights on disk before the export: a failed export loses nothing
    summary: dict = {}
    if run.resid_std is not None:
        run.resid_std.remove()  # the exported model carries no training hook
    model = _full_model(run)
    if acc.is_main_process:
        fakes = {} if cfg.keep_ln else find_fakes(model)
        live = [n for n, f in fakes.items() if f.is_live]
        if live:
            raise Diverged(f"{len(live)} LayerNorms are still live at the end (first {live[0]}); "
                           f"the schedule did not finish.")
        plain = (export.plain_ln_copy(model, cfg.model) if cfg.keep_ln else export.to_plain(model, cfg.model))
        tmp = out / ".export-tmp"
        _export(export, plain, run.tokenizer, tmp)
        diff = _check_export(model, tmp, run.held[:4])
        if not math.isfinite(diff) or diff > EXPORT_TOL:
            raise Diverged(f"the exported model differs from the trained one by {diff:.3g} in the logits; "
                           f"nothing was written, checkpoints are in {run.ckpt_root}.")
        with writing(out, f"the exported model in {out}"):
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        from models import load_hf

        loaded, _, info = load_hf(str(out))
        final_ce = heldout_ce(loaded.to(acc.device), run.held)  # on the training device, like the initial CE
        sigmas = {} if cfg.keep_ln else {n: float(ln.sigma) for n, ln in fake_norms(model).items()}
        summary = report.build_run_json(cfg, run, initial_ce, final_ce, diff, sigmas, info,
                                        run.wall_before + time.time() - run.t0)
        write_atomic(out / "README.md", report.model_card(summary))
        write_atomic(out / "run.json", json.dumps(summary, indent=1) + "\n")  # last: run.json = finished
        if not cfg.keep_checkpoints:
            (out / RUN_CONFIG).unlink(missing_ok=True)
            remove_tree(run.ckpt_root)
        tqdm.write(report.summary_table(summary))
    return summary


def _export(export, plain, tokenizer, tmp: Path) -> None:
    """The exported files in `tmp`; on a failed write the partial files go, to give the space back."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(tmp, f"the exported model in {tmp.parent}"):
            export.save(plain, tokenizer, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _full_model(run: Run):
    """The trained model, whole and in fp32, on the main process (None elsewhere)."""
    from accelerate.utils import DistributedType

    acc = run.acc
    if acc.distributed_type == DistributedType.FSDP:
        state = acc.get_state_dict(run.model)  # a collective: every process gathers
        if not acc.is_main_process:
            return None
        model, _ = load_base(run.cfg)
        if not run.cfg.keep_ln:
            convert_to_fake(model)
        model.load_state_dict(state)
        return model.to(acc.device).float().eval()
    # Without Accelerate's autocast wrapper: the export is checked in plain fp32.
    return acc.unwrap_model(run.model, keep_fp32_wrapper=False).float().eval() if acc.is_main_process else None


@torch.no_grad()
def _check_export(model, path: Path, ids: torch.Tensor) -> float:
    """Max |logit difference| between the trained model and the exported one, loaded by plain transformers."""
    from transformers import GPT2LMHeadModel

    plain = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    device = next(model.parameters()).device
    a = model(ids.to(device)).logits.float().cpu()
    b = plain(ids).logits.float()
    return (a - b).abs().max().item()
