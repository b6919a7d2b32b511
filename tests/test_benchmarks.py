"""Smoke tests of benchmarks/: the scripts run (tiny model, seconds) and the official-sampler baseline matches generate."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def run(capsys, monkeypatch):
    """Run a benchmark script in this process, as `python script args` would (its stdout is returned). With
    `without_diffusers`, as on the GPU image, where neither diffusers nor PIL can be imported."""

    def run_script(script, *args, without_diffusers=False):
        monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
        monkeypatch.syspath_prepend(str(BENCH))
        if without_diffusers:
            for name in ("diffusers", "PIL"):
                monkeypatch.setitem(sys.modules, name, None)
        threads = torch.get_num_threads()
        capsys.readouterr()
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit:
            assert exit.code in (0, None), capsys.readouterr()
        finally:
            torch.set_num_threads(threads)
        return capsys.readouterr().out

    return run_script


def test_generate_with_baseline_and_check(run):
    out = run(BENCH / "generate.py", "--preset", "tiny", "--num_tokens", "4", "--baseline", "--check",
              "--repeats", "1", "--threads", "1")
    assert "check ok" in out
    lines = [line for line in out.splitlines() if line.startswith("generate ")]
    assert len(lines) == 2 and "impl=hf" in lines[0] and "impl=official" in lines[1]
    assert "speedup_vs_official=" in lines[0] and "tokens/s=" in lines[0] and "peak_mem=" in lines[0]


def test_generate_json_static_cache_without_diffusers(run):
    out = run(BENCH / "generate.py", "--preset", "tiny", "--num_tokens", "3", "--cache", "static", "--dtype", "bfloat16",
              "--repeats", "1", "--threads", "1", "--json", without_diffusers=True)
    (record,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert record["cache"] == "static" and record["dtype"] == "bfloat16" and record["num_tokens"] == 3
    assert record["extrapolated"] and record["tokens_per_s"] > 0 and record["peak_mem_bytes"] > 0


def test_train_step(run):
    out = run(BENCH / "train_step.py", "--preset", "tiny", "--steps", "1", "--threads", "1", without_diffusers=True)
    assert out.startswith("train_step preset=tiny") and "tokens/s=" in out


def test_linear_kernels(run):
    out = run(BENCH / "linear_kernels.py", "--preset", "tiny", "--repeats", "1", "--threads", "1")
    assert out.startswith("tiny: 8 matmuls") and "F.linear" in out and "GB/s" in out
    assert "oneDNN prepacked" in out


def test_step_profile_splits_a_step_against_the_bandwidth_floor(run):
    out = run(BENCH / "step_profile.py", "--preset", "tiny", "--num_tokens", "3", "--threads", "1", "--top", "3")
    lines = out.splitlines()
    split = {line.split()[0]: float(line.split()[1]) for line in lines if line.strip().split()[:1] in
             (["weights"], ["attention"], ["rest"], ["total"])}
    assert split.keys() == {"weights", "attention", "rest", "total"} and split["weights"] > 0
    assert abs(split["weights"] + split["attention"] + split["rest"] - split["total"]) < 0.05
    assert any(line.strip().startswith("floor:") and "GB/s" in line for line in lines)


def test_run_all_grids_build(run):
    out = run(BENCH / "run_all.py", "--grid", "gpu", "--dry-run")
    commands = out.strip().splitlines()
    assert len(commands) >= 10 and all("--json" in c for c in commands)
    assert any("--compile" in c and "--cache static" in c and "rar-xl" in c for c in commands)
    assert any("train_step.py" in c for c in commands)
    assert any("--impl official" in c or "--baseline" in c for c in commands)
    assert len(run(BENCH / "run_all.py", "--dry-run").strip().splitlines()) == 9
    gpu_sh = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--dry-run"], capture_output=True, text=True, env=ENV,
                            cwd=REPO, timeout=120)
    assert gpu_sh.returncode == 0 and "--preset rar-xl" in gpu_sh.stdout, gpu_sh.stderr


def test_adaptation_table_compares_full_fine_tuning_and_lora(run, tmp_path):
    out = run(BENCH / "adaptation.py", "--work_dir", tmp_path, "--pretrain_steps", "2", "--adapt_steps", "2",
              "--num_per_class", "2", "--guidance_scales", "2", "--in_process", "--rows", "full, null init", "LoRA r=8",
              "--output_json", tmp_path / "adaptation.json")  # fmt: skip
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "steps on 5-9" not in line}
    assert list(rows) == ["full, null init", "LoRA r=8"]
    trainable = {name: int(cells[-4].replace(",", "")) for name, cells in rows.items()}
    assert trainable["full, null init"] > 10 * trainable["LoRA r=8"] > 0
    results = json.loads((tmp_path / "adaptation.json").read_text())
    assert [r["row"] for r in results["adaptation"]] == list(rows)
    assert all(0 <= r["quality"][0]["accuracy"] <= 1 and r["quality"][0]["frechet"] >= 0 for r in results["adaptation"])


@pytest.mark.parametrize("fold", [False, True])
def test_official_sampler_parity(fold, one_thread):
    sys.path.insert(0, str(BENCH))
    try:
        from official_sampler import check_parity, tiny_model
    finally:
        sys.path.remove(str(BENCH))
    diff, scale, agree = check_parity(tiny_model(fold), 4.0, 2.0, cache_implementation="static")
    assert diff <= 1e-4 * max(1.0, scale) and agree == 1.0


# ------------------------------------------------------------------------------------------------ the GPU run (issue 23)
def test_generate_profiles_decoding_steps_and_times_the_pipeline(run):
    out = run(BENCH / "generate.py", "--preset", "tiny", "--num_tokens", "3", "--batch_size", "2", "3", "--repeats", "1",
              "--guidance_scale", "3.0", "--profile", "3", "--threads", "1", "--json")
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["bench"], r["batch_size"]) for r in records] == [("generate", 2), ("profile", 2), ("generate", 3)]
    profile = records[1]
    assert "error" not in profile and profile["steps"] == 3 and profile["wall_ms_per_step"] > 0
    # every part of a decoding step is named, and the parts add up to the wall time
    assert {"step inputs + modulations", "logits processors", "stopping criteria", "attention kernel", "cache update",
            "mlp", "attention: qkv/o projections, q/k norms", "host outside any op (Python)"} <= set(profile["host_ms"])
    assert abs(sum(profile["host_ms"].values()) - profile["wall_ms_per_step"]) < 0.01 * profile["wall_ms_per_step"] + 0.01
    assert profile["device_ms"] is None and profile["syncs_per_step"] == 0  # a CPU has neither

    out = run(BENCH / "generate.py", "--preset", "tiny", "--batch_size", "2", "--repeats", "1", "--dtype", "bfloat16",
              "--pipeline", "--threads", "1", "--json")
    (record,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert record["bench"] == "pipeline" and record["dtype"] == "bfloat16" and record["vq_dtype"] == "float32"
    assert set(record["split_seconds"]) == {"sampling (generate)", "decoding (float32 VQ)", "conversion to PIL"}
    assert sum(record["split_seconds"].values()) <= record["seconds"] and record["generate_seconds"] > 0


def test_gpu_grid_profiles_older_code_side_by_side(run, tmp_path):
    (tmp_path / "rar_hf").mkdir()
    (tmp_path / "rar_hf" / "__init__.py").write_text("")
    commands = run(BENCH / "run_all.py", "--grid", "gpu", "--before_src", str(tmp_path), "--dry-run").splitlines()
    before = [c for c in commands if "--label before" in c]
    assert len(before) == 1 and before[0].startswith(f"PYTHONPATH={tmp_path} ") and "--profile 16" in before[0]
    assert sum("--profile" in c for c in commands) == 3  # eager and compiled after, eager before
    with pytest.raises(SystemExit, match="holds no rar_hf package"):
        run_all().main(["--grid", "gpu", "--before_src", str(tmp_path / "nothing"), "--dry-run"])


def run_all():
    sys.path.insert(0, str(BENCH))
    try:
        import run_all as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_a_row_cut_short_keeps_the_records_it_printed(tmp_path):
    run_one = run_all().run_one
    script = tmp_path / "slow.py"
    script.write_text('import time\nprint(\'{"bench": "x"}\', flush=True)\ntime.sleep(60)\n')
    records, error = run_one([sys.executable, str(script)], timeout=2)
    assert records == [{"bench": "x"}] and error.startswith("timeout after 2 s (1 record(s) kept)")


def test_gpu_sh_stops_at_once_without_the_pinned_packages(tmp_path):
    fake = tmp_path / "site" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '4.99.0'\n")
    env = {**ENV, "PRESET": "tiny", "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "PYTHONPATH": str(tmp_path / "site"), "WHEEL_DIR": str(tmp_path / "no-wheels")}  # not the checkout's .whl/
    result = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "FAILED: transformers 5.24.0 is needed, found 4.99.0" in result.stdout + result.stderr
    assert "pip download" in result.stdout + result.stderr
