"""The app's background analysis (attribution.jobs): how many CPU threads it computes on."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from attribution import Settings
from attribution.jobs import CPU_THREADS, PairJob, all_threads, threads_for
from attribution.report import STAGES, Analysis
from models import load_bridge


def _pair_of_width(d_model: int, device: str = "cpu"):
    model = SimpleNamespace(bridge=SimpleNamespace(cfg=SimpleNamespace(d_model=d_model),
                                                   W_U=torch.empty(0, device=device)))
    return SimpleNamespace(sides=(SimpleNamespace(model=model), SimpleNamespace(model=model)))


def test_small_pairs_run_on_one_thread_wide_ones_on_all_and_the_count_comes_back():
    seen = []
    for width in (256, 768):
        with threads_for(_pair_of_width(width)):
            seen.append(torch.get_num_threads())
        assert torch.get_num_threads() == CPU_THREADS
    assert seen == [1, CPU_THREADS]
    with threads_for(_pair_of_width(256, device="meta")):  # not on the CPU: left as it is
        assert torch.get_num_threads() == CPU_THREADS


def test_a_job_on_a_small_pair_computes_on_one_thread(tiny_ln_dir, real_scale_lnfree_dir, monkeypatch):
    seen = []
    run = Analysis.run

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return run(self, *args, **kwargs)

    monkeypatch.setattr(Analysis, "run", spy)
    job = PairJob(load_bridge(str(tiny_ln_dir)), load_bridge(str(real_scale_lnfree_dir)),
                  Settings(task="induction", n_prompts=2, seq_len=4))
    while job.running:
        job.wait(0.1)
    assert job.complete and job.error is None
    assert len(seen) == 2 * len(STAGES) and set(seen) == {1}  # every stage of both models
    assert torch.get_num_threads() == CPU_THREADS


def test_a_thread_started_during_a_small_job_takes_every_thread_back_and_leaves_the_job_its_one():
    """torch's thread counts are per thread: a page run that starts while a small pair's job runs begins with
    that job's one thread until it calls all_threads, which leaves the job its one."""
    inside, release, seen = threading.Event(), threading.Event(), {}

    def job():
        with threads_for(_pair_of_width(256)):
            inside.set()
            release.wait(10)
            seen["job"] = torch.get_num_threads()

    def page_run():
        seen["started with"] = torch.get_num_threads()
        all_threads()
        seen["page"] = torch.get_num_threads()

    worker = threading.Thread(target=job)
    worker.start()
    inside.wait(10)
    page = threading.Thread(target=page_run)
    page.start()
    page.join(10)
    release.set()
    worker.join(10)
    assert seen == {"started with": 1, "page": CPU_THREADS, "job": 1}
