"""The removal training loop: steps, checkpoints, recovery from divergence, export and the run report."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lnfree import checkpoint as ckpt
from lnfree.config import MAX_RECOVERIES, Diverged, RunConfig, UserError, save_run_config
from lnfree.fake_ln import convert_to_fake, find_fakes
from lnfree.run import Run, heldout_ce, load_base

EXPORT_TOL = 1e-4


def _prepare_output(cfg: RunConfig, resume: bool) -> None:
    out = Path(cfg.output_dir)
    if resume and (out / "run.json").exists():
        raise UserError(f"The run in {out} is already finished; see {out / 'run.json'}.")
    save_run_config(cfg)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after checkpoint `step` by a killed run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: RunConfig, resume: bool = False) -> dict:
    start_time = time.time()
    previous = ckpt.checkpoints(Path(cfg.output_dir) / "checkpoints") if resume else []
    run = Run(cfg, eval_initial=not previous)
    run.t0 = start_time  # this segment's setup counts too
    acc, out = run.acc, run.out
    if acc.is_main_process:
        _prepare_output(cfg, resume)
    acc.wait_for_everyone()
    metrics_path = out / "metrics.jsonl"
    if previous:
        run.restore(previous[-1], resume=True)
        if acc.is_main_process:
            _truncate_metrics(metrics_path, run.step)
            tqdm.write(f"resumed from {previous[-1].name} ({run.removed()} LNs removed)")
    elif acc.is_main_process:
        _truncate_metrics(metrics_path, 0)
    if cfg.log_with:
        acc.init_trackers("lnfree", config={k: v for k, v in cfg.recipe.items() if v is not None})
    initial_ce = run.initial_ce
    if run.step == 0:
        if cfg.auto_recover:
            run.save()  # a rollback target before the first real checkpoint
    n_fakes = len(run.fake_modules())
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not acc.is_main_process, desc="removing LN"
               if not cfg.keep_ln else "fine-tuning", dynamic_ncols=True)
    t_last = time.time()
    while run.step < cfg.max_steps:
        step = run.step + 1
        m, gone, bad = run.advance(step)
        if bad:
            bar.close()
            _handle_divergence(run, step, bad)
            bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not acc.is_main_process,
                       desc="removing LN (recovered)", dynamic_ncols=True)
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
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}", aux=f"{m['aux']:.3g}",
                            gnorm=f"{m['grad_norm']:.2f}", tok_s=f"{rate:,.0f}", ln=f"{removed}/{n_fakes}")
            bar.update(1)
        if cfg.log_with:
            acc.log(row, step=step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            run.save()
    bar.close()
    if cfg.log_with:
        acc.end_training()
    summary = finish(run, initial_ce)
    acc.wait_for_everyone()
    return summary


def _handle_divergence(run: Run, step: int, why: str) -> None:
    previous = ckpt.checkpoints(run.ckpt_root)
    where = f"the last good checkpoint is {previous[-1]}" if previous else "no checkpoint was written yet"
    if not run.cfg.auto_recover or run.recoveries >= MAX_RECOVERIES or not previous:
        raise Diverged(f"step {step}: {why}; {where}; rerun with --resume and a lower --lr, or with "
                       f"--auto-recover.")
    scale = run.lr_scale * 0.5
    recoveries = run.recoveries + 1
    run.restore(previous[-1])
    run.recoveries = recoveries
    run.set_lr_scale(scale)
    msg = (f"step {step}: {why}; rolled back to {previous[-1].name} and continuing with LR x{scale:g} "
           f"(recovery {recoveries}/{MAX_RECOVERIES})")
    if run.acc.is_main_process:
        tqdm.write(msg)
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": run.step, "event": "rollback", "message": msg}) + "\n")


# ------------------------------------------------------------------------------------------------ finish


def finish(run: Run, initial_ce: float | None) -> dict:
    from lnfree import export, report

    cfg, acc, out = run.cfg, run.acc, run.out
    summary: dict = {}
    model = _full_model(run)
    if acc.is_main_process:
        fakes = {} if cfg.keep_ln else find_fakes(model)
        live = [n for n, f in fakes.items() if f.is_live]
        if live:
            raise Diverged(f"{len(live)} LayerNorms are still live at the end (first {live[0]}); "
                           f"the schedule did not finish.")
        plain = (export.plain_ln_copy(model, cfg.model) if cfg.keep_ln else export.to_plain(model, cfg.model))
        tmp = out / ".export-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export.save(plain, run.tokenizer, tmp)
        diff = _check_export(model, tmp, run.held[:4])
        if not math.isfinite(diff) or diff > EXPORT_TOL:
            raise Diverged(f"the exported model differs from the trained one by {diff:.3g} in the logits; "
                           f"nothing was written, checkpoints are in {run.ckpt_root}.")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
        from models import load_hf

        loaded, _, info = load_hf(str(out))
        final_ce = heldout_ce(loaded.to(acc.device), run.held)  # on the training device, like the initial CE
        sigmas = {n: float(f.sigma) for n, f in fakes.items()}
        summary = report.build_run_json(cfg, run, initial_ce, final_ce, diff, sigmas, info,
                                        run.wall_before + time.time() - run.t0)
        (out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "README.md").write_text(report.model_card(summary))
        if not cfg.keep_checkpoints:
            shutil.rmtree(run.ckpt_root, ignore_errors=True)
            (out / "run_config.json").unlink(missing_ok=True)
        tqdm.write(report.summary_table(summary))
    return summary


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
