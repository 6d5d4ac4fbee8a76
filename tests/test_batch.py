"""sd-batch: job lines checked one by one, one PNG per job, results.jsonl, resuming, and the same pixels on a local
Ray cluster (2 workers) as in-process, also when a worker dies mid-run. The demo model, 64x64, 3 steps."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from stable_diffusion_tf import batch
from stable_diffusion_tf.batch import Defaults, Job, ResultsLog, parse_job, read_jobs, run_job
from stable_diffusion_tf.errors import InputError

FLAGS = ["--weights", "demo", "--steps", "3", "--seed", "100", "--quiet"]
LINES = [
    {"id": "red", "prompt": "a red circle on a blue background", "seed": 1},
    {"prompt": "a green square on a yellow background", "seed": 2, "sampler": "euler_a", "guidance_scale": 5},
    "not json {",
    {"prompt": "a blue triangle", "id": "../escape"},
    "",
    {"id": "redrawn", "prompt": "a white square on a black background", "mode": "img2img", "image": "start.png",
     "strength": 0.6, "seed": 3},
    {"prompt": "a blue triangle on a white background", "steps": 0},
    {"id": "last", "prompt": "a yellow triangle on a purple background", "negative_prompt": "green"},
]
PNGS = {"red.png", "2.png", "redrawn.png", "last.png"}  # line 8 has no seed: --seed 100 + 8 - 1 = 107
BAD = {3: "invalid JSON", 4: "id must be", 7: "steps must be"}


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jobs")
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    Image.fromarray(pixels).save(folder / "start.png")
    with open(folder / "jobs.jsonl", "w") as f:
        f.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in LINES)
    return str(folder / "jobs.jsonl")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module (starting one costs seconds); "local": a new one, even where `ray start`
    runs a cluster."""
    ray = pytest.importorskip("ray")
    ray.init("local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def run(jobs_file, output, *more):
    return batch.main([jobs_file, "--output-dir", str(output), *FLAGS, *more])


def rows(folder) -> list[dict]:
    with open(os.path.join(folder, batch.RESULTS), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pictures(folder) -> dict:
    """Each PNG's pixels and recipe, by file name."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            with Image.open(os.path.join(folder, name)) as image:
                found[name] = (np.asarray(image), image.info["parameters"])
    return found


def without_times(found: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in row.items() if k != "seconds"} for row in found), key=lambda row: row["line"])


@pytest.fixture(scope="module")
def in_process(jobs_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("in-process")
    assert run(jobs_file, output) == batch.EXIT_FAILED_JOBS  # the bad lines
    return str(output)


def test_in_process_run_writes_one_png_per_good_line_and_reports_the_bad(in_process):
    found = pictures(in_process)
    assert set(found) == PNGS and not [n for n in os.listdir(in_process) if n.endswith(".tmp")]
    results = rows(in_process)
    assert sorted(row["line"] for row in results) == [1, 2, 3, 4, 6, 7, 8]  # one per line, the blank one passed over
    for row in results:
        if row["line"] in BAD:
            assert row["status"] == "error" and BAD[row["line"]] in row["error"] and row["output"] is None
        else:
            assert row["status"] == "ok" and row["error"] is None and row["seconds"] > 0
            assert f"Seed: {row['seed']}," in found[row["output"]][1]
    assert {row["output"]: row["seed"] for row in results if row["output"]}["last.png"] == 107
    assert "Sampler: Euler a, CFG scale: 5," in found["2.png"][1]
    assert "Negative prompt: green" in found["last.png"][1]
    assert "Denoising strength: 0.6" in found["redrawn.png"][1]
    assert len({array.tobytes() for array, _ in found.values()}) == len(PNGS)


def test_ray_gives_the_same_pngs_and_results(cluster, jobs_file, in_process, tmp_path):
    assert run(jobs_file, tmp_path, "--ray", "--workers", "2") == batch.EXIT_FAILED_JOBS
    ours, theirs = pictures(tmp_path), pictures(in_process)
    assert set(ours) == PNGS
    for name in PNGS:
        np.testing.assert_array_equal(ours[name][0], theirs[name][0])
        assert ours[name][1] == theirs[name][1]
    assert without_times(rows(tmp_path)) == without_times(rows(in_process))


def test_a_worker_killed_mid_run_still_gives_one_png_per_job(cluster, jobs_file, in_process, tmp_path, monkeypatch):
    monkeypatch.setenv(batch.TEST_DIE_AFTER, "1")  # the first worker to finish an image dies taking the next job
    assert run(jobs_file, tmp_path, "--ray", "--workers", "2") == batch.EXIT_FAILED_JOBS
    assert os.path.exists(tmp_path / batch.DIED)  # it did die
    assert sorted(os.listdir(tmp_path)) == sorted(PNGS | {batch.RESULTS, batch.DIED})  # no temporary files either
    done = [row for row in rows(tmp_path) if row["output"]]
    assert sorted(row["output"] for row in done) == sorted(PNGS) and {row["status"] for row in done} == {"ok"}
    ours, theirs = pictures(tmp_path), pictures(in_process)
    for name in PNGS:
        np.testing.assert_array_equal(ours[name][0], theirs[name][0])


def test_a_model_that_cannot_load_on_ray_stops_the_run_with_one_error_line(cluster, jobs_file, tmp_path, capsys):
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(b"garbage!")
    output = tmp_path / "out"
    assert batch.main([jobs_file, "--output-dir", str(output), "--weights", str(weights), "--quiet", "--ray"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # Ray's own lines come before it
    assert last.startswith("sd-batch: error: the Ray run stopped: ") and "not a checkpoint" in last
    assert not [name for name in os.listdir(output) if name.endswith(".png")]


def test_a_second_run_skips_finished_jobs_and_redoes_a_missing_one(jobs_file, in_process, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(in_process, output)
    before = {name: os.stat(output / name).st_mtime_ns for name in PNGS}
    os.remove(output / "2.png")  # as if the run had stopped before it
    first = len(rows(output))
    assert run(jobs_file, output) == batch.EXIT_FAILED_JOBS
    again = {row["line"]: row for row in rows(output)[first:]}
    assert sorted(again) == [1, 2, 3, 4, 6, 7, 8]
    assert [line for line, row in again.items() if row["status"] == "skipped"] == [1, 6, 8]
    assert again[2]["status"] == "ok"
    for name in PNGS - {"2.png"}:
        assert os.stat(output / name).st_mtime_ns == before[name]
    np.testing.assert_array_equal(pictures(output)["2.png"][0], pictures(in_process)["2.png"][0])


def test_a_job_whose_png_appeared_meanwhile_is_skipped_without_generating(tmp_path):
    job = parse_job('{"prompt": "a cat", "seed": 4}', 5)
    (tmp_path / job.file).write_bytes(b"made by an earlier attempt")
    row = run_job(None, job, str(tmp_path))  # None: the pipeline would fail if it were called
    assert row["status"] == "skipped" and row["output"] == "5.png" and row["seed"] == 4


def test_a_failing_job_is_an_error_row(tmp_path):
    class Broken:
        def text_to_image(self, *args, **kwargs):
            raise InputError("prompt too long")

    row = run_job(Broken(), parse_job('{"prompt": "a cat", "seed": 4}', 1), str(tmp_path))
    assert row["status"] == "error" and row["error"] == "prompt too long" and os.listdir(tmp_path) == []


def test_a_job_travels_as_json_unchanged():
    job = parse_job('{"prompt": "ünïcode \\"q\\"", "guidance_scale": 7, "seed": 4294967295, "id": 12}', 3)
    assert Job.from_json(job.to_json()) == job
    assert (job.id, job.seed, job.guidance_scale, job.file) == ("12", 4294967295, 7.0, "12.png")


def test_defaults_fill_what_a_job_leaves_out():
    defaults = Defaults(negative_prompt="blurry", steps=9, sampler="heun", guidance_scale=3, width=96, height=32,
                        seed=4294967295)
    job = parse_job('{"prompt": "a cat"}', 2, defaults)
    assert (job.id, job.mode, job.negative_prompt, job.steps, job.sampler, job.guidance_scale, job.width,
            job.height, job.seed) == ("2", "txt2img", "blurry", 9, "heun", 3, 96, 32, 0)  # the seed wraps around
    assert parse_job('{"prompt": "a", "sampler": "DPM++ 2M Karras"}', 1).sampler == "dpm++2m_karras"
    assert parse_job('{"prompt": "a"}', 1).width is None  # the model's size
    drawn = {parse_job('{"prompt": "a"}', 1).seed for _ in range(4)}
    assert len(drawn) > 1  # no --seed: a random one each


@pytest.mark.parametrize("line, message", [
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": 3}', "prompt must be a string"),
    ('{"negative_prompt": "x"}', "prompt is missing"),
    ('{"prompt": "a", "seeds": 3}', "unknown field 'seeds'"),
    ('{"prompt": "a", "id": ""}', "id must be"),
    ('{"prompt": "a", "id": ".."}', "id must be"),
    ('{"prompt": "a", "id": "a/b"}', "id must be"),
    ('{"prompt": "a", "id": "a\\\\b"}', "id must be"),
    ('{"prompt": "a", "id": "' + "x" * 101 + '"}', "id must be"),
    ('{"prompt": "a", "id": true}', "id must be"),
    ('{"prompt": "a", "seed": -1}', "seed must be"),
    ('{"prompt": "a", "seed": 4294967296}', "seed must be"),
    ('{"prompt": "a", "seed": 1.5}', "seed must be"),
    ('{"prompt": "a", "steps": 1001}', "steps must be"),
    ('{"prompt": "a", "steps": true}', "steps must be"),
    ('{"prompt": "a", "guidance_scale": NaN}', "guidance_scale must be"),
    ('{"prompt": "a", "guidance_scale": -1}', "guidance_scale must be"),
    ('{"prompt": "a", "guidance_scale": "7"}', "guidance_scale must be"),
    ('{"prompt": "a", "sampler": "fast"}', "sampler must be"),
    ('{"prompt": "a", "sampler": ["ddim"]}', "sampler must be"),
    ('{"prompt": "a", "width": 65}', "width must be"),
    ('{"prompt": "a", "height": 4096}', "height must be"),
    ('{"prompt": "a", "mode": "upscale"}', "mode must be"),
    ('{"prompt": "a", "image": "x.png"}', "image is for mode img2img or inpaint only"),
    ('{"prompt": "a", "mode": "img2img"}', "image (a file path) is missing"),
    ('{"prompt": "a", "mode": "img2img", "image": "missing.png"}', "image 'missing.png': no such file"),
    ('{"prompt": "a", "mode": "img2img", "image": "start.png", "mask": "start.png"}', "mask is for mode inpaint"),
    ('{"prompt": "a", "mode": "img2img", "image": "start.png", "width": 64}', "width is for mode txt2img"),
    ('{"prompt": "a", "mode": "img2img", "image": "start.png", "strength": 1.5}', "strength must be"),
    ('{"prompt": "a", "mode": "inpaint", "image": "start.png"}', "mask (a file path) is missing"),
    ('{"prompt": "a", "mode": "inpaint", "image": "start.png", "mask": "start.png", "mask_blur": -2}',
     "mask_blur must be"),
])
def test_bad_fields_are_named(jobs_file, line, message):
    with pytest.raises(InputError, match=f"^{message.replace('(', '.').replace(')', '.')}"):
        parse_job(line, 1, folder=os.path.dirname(jobs_file))


def test_image_paths_are_relative_to_the_jobs_file(jobs_file):
    job = parse_job('{"prompt": "a", "mode": "inpaint", "image": "start.png", "mask": "start.png"}', 1,
                    folder=os.path.dirname(jobs_file))
    assert job.image == job.mask == os.path.join(os.path.dirname(jobs_file), "start.png")
    assert (job.strength, job.mask_blur) == (1.0, 0)


def test_read_jobs_reports_duplicates_long_lines_and_bad_utf8(tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "MAX_LINE", 60)
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n{"prompt": "' + b"c" * 100
                     + b'"}\n\xff\xfe\n{"prompt": "d"}')  # no newline at the end
    jobs, bad = read_jobs(path, Defaults(seed=0))
    assert [(job.line, job.id) for job in jobs] == [(1, "x"), (5, "5")]
    assert [(row["line"], row["status"]) for row in bad] == [(2, "error"), (3, "error"), (4, "error")]
    assert "already the id of line 1" in bad[0]["error"] and "longer than 60 bytes" in bad[1]["error"]
    assert "utf-8" in bad[2]["error"] and bad[0]["job"] == {"prompt": "b", "id": "x"}


def test_results_log_writes_whole_lines_after_a_cut_one(tmp_path):
    path = tmp_path / batch.RESULTS
    path.write_text('{"line": 1}\n{"line": 2, "sta')  # a run stopped mid-line
    log = ResultsLog(str(path))
    log.write({"line": 3, "prompt": "ünï"})
    log.close()
    assert path.read_text(encoding="utf-8").splitlines()[2:] == ['{"line": 3, "prompt": "ünï"}']


@pytest.mark.parametrize("argv, message", [
    (["missing.jsonl", "--output-dir", "out"], "cannot read the jobs file 'missing.jsonl'"),
    (["jobs.jsonl", "--output-dir", "out", "--workers", "2"], "--workers, --gpus-per-worker and --cpus-per-worker "
                                                               "need --ray"),
    (["jobs.jsonl", "--output-dir", "out", "--weights", "nothing.safetensors"], "argument --weights"),
    (["jobs.jsonl", "--output-dir", "out", "--steps", "0"], "argument --steps"),
    (["jobs.jsonl"], "the following arguments are required: --output-dir"),
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a"}\n')
    assert batch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd-batch: error: ") and message in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["jobs.jsonl"]
