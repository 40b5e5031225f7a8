"""The example pipelines and the quick-start demo (``make run``).

The ``documents`` steps are called directly with a ``StepContext`` on a file in a temporary
directory; the demo runs end to end as a subprocess, with its real worker subprocess.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conveyor import PipelineError, PipelineService, StepContext

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the root out
    sys.path.insert(0, str(ROOT))

from examples import doc_pipeline, noop_pipeline  # noqa: E402

DOCUMENT = (
    "The Cat\n"
    "\n"
    "The cat sat on the mat. The dog didn\u2019t!\n"
    "A caf\u00e9\u2014open late? Yes: 3.5 cups.\n"
)


def run_steps(
    data: dict[str, Any],
    *,
    progress: list[tuple[float, str | None]] | None = None,
    cancelled: bool = False,
    shutting_down: bool = False,
    until: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline's steps in order as the worker's child does; their results by name."""
    results: dict[str, Any] = {}
    for step in doc_pipeline.documents.steps:
        ctx = StepContext(
            task_id="t-1",
            data=data,
            results=results,
            attempt=1,
            queue="q",
            step=step.name,
            report_progress=lambda f, m: progress.append((f, m)) if progress is not None else None,
            is_cancelled=lambda: cancelled,
            is_shutting_down=lambda: shutting_down,
        )
        results[step.name] = step.function(ctx)
        json.dumps(results[step.name])  # the worker stores every step's result as JSON
        if step.name == until:
            break
    return results


@pytest.fixture
def document(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "cat_story.txt"
    path.parent.mkdir()
    path.write_text(DOCUMENT, encoding="utf-8")
    return path


def test_steps_are_in_order_and_module_level() -> None:
    steps = doc_pipeline.documents.steps
    assert [step.name for step in steps] == ["read", "normalise", "statistics", "report"]
    for step in steps:  # the worker's children find steps by their qualified name
        assert getattr(doc_pipeline, step.function.__name__) is step.function


def test_statistics_of_a_document(document: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = run_steps({"path": str(document), "output_dir": str(out), "step_delay": 0})

    assert results["read"]["text"] == DOCUMENT
    assert results["read"]["name"] == "cat_story.txt"
    assert results["read"]["bytes"] == len(DOCUMENT.encode())
    assert results["normalise"]["text"] == (
        "the cat the cat sat on the mat the dog didnt a caf\u00e9 open late yes 3.5 cups"
    )
    stats = results["statistics"]
    assert stats["words"] == 18
    assert stats["unique_words"] == 14
    assert [(e["word"], e["count"]) for e in stats["top_words"]] == [
        ("the", 4), ("cat", 2), ("3.5", 1), ("a", 1), ("caf\u00e9", 1),
        ("cups", 1), ("didnt", 1), ("dog", 1), ("late", 1), ("mat", 1),
    ]  # fmt: skip
    assert [e["word"] for e in stats["top_keywords"]] == [
        "cat", "caf\u00e9", "cups", "didnt", "dog", "late", "mat", "open", "sat", "yes",
    ]  # fmt: skip
    assert stats["sentences"] == 5  # the heading, 2 in the first line, 2 in the second
    assert stats["paragraphs"] == 2
    assert stats["average_word_length"] == round(57 / 18, 2)
    assert stats["reading_time_seconds"] == round(18 * 60 / 200)

    report = results["report"]
    assert report["report"] == str((out / "cat_story.json").resolve())
    assert report["document"] == "cat_story.txt"
    assert report["summary"]["words"] == 18
    assert report["summary"]["top_words"] == ["the", "cat", "3.5", "a", "caf\u00e9"]
    written = json.loads((out / "cat_story.json").read_text(encoding="utf-8"))
    assert written["statistics"] == stats
    assert written["source"] == str(document.resolve())
    assert written["task_id"] == "t-1"
    assert [p.name for p in out.iterdir()] == ["cat_story.json"]  # no temporary file left


def test_a_rerun_replaces_the_report(document: Path, tmp_path: Path) -> None:
    data = {"path": str(document), "output_dir": str(tmp_path / "out"), "step_delay": 0}
    run_steps(data)
    document.write_text("One two. Three.", encoding="utf-8")
    results = run_steps(data)
    written = json.loads(Path(results["report"]["report"]).read_text(encoding="utf-8"))
    assert written["statistics"]["words"] == 3
    assert written["statistics"]["sentences"] == 2


def test_an_empty_document(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n", encoding="utf-8")
    results = run_steps({"path": str(path), "output_dir": str(tmp_path), "step_delay": 0})
    stats = results["statistics"]
    assert (stats["words"], stats["unique_words"], stats["sentences"]) == (0, 0, 0)
    assert stats["top_words"] == [] and stats["average_word_length"] == 0.0


def test_normalise_text() -> None:
    normalise = doc_pipeline.normalise_text
    assert normalise("\ufb01ne  \u2460 \uff21BC") == "fine 1 abc"  # NFKC: ligature, circled, wide
    assert normalise("Rock\u2019n\u2019roll, \u201cquoted\u201d \u2014 end.") == (
        "rocknroll quoted end"
    )
    assert normalise("well-known e-mail: x@y.z (a_b) 10,000 vs 1.5%") == (
        "well known e mail x y z a b 10,000 vs 1.5"
    )
    assert normalise("Tabs\tand\n\nnew\r\nlines") == "tabs and new lines"


def test_progress_covers_each_steps_share(document: Path, tmp_path: Path) -> None:
    progress: list[tuple[float, str | None]] = []
    data = {"path": str(document), "output_dir": str(tmp_path), "step_delay": 0.1}
    started = time.monotonic()
    run_steps(data, progress=progress)
    assert time.monotonic() - started >= 0.4  # 4 steps x step_delay
    fractions = [fraction for fraction, _ in progress]
    assert fractions == sorted(fractions)
    assert fractions[0] >= 0 and fractions[-1] == 1.0
    assert len(progress) > 8  # several reports per step
    by_step = {
        name: [f for f, m in progress if m and m.startswith(name + ":")]
        for name in ("read", "normalise", "statistics", "report")
    }
    for index, (name, seen) in enumerate(by_step.items()):
        assert seen, f"no progress from step {name}"
        assert all(index / 4 <= f <= (index + 1) / 4 for f in seen), (name, seen)
        assert seen[-1] == (index + 1) / 4


@pytest.mark.parametrize("flag", ["cancelled", "shutting_down"])
def test_a_step_stops_waiting_when_asked(flag: str, document: Path, tmp_path: Path) -> None:
    data = {"path": str(document), "output_dir": str(tmp_path), "step_delay": 5}
    started = time.monotonic()
    results = run_steps(data, **{flag: True})
    assert time.monotonic() - started < 2  # not 4 x 5 s
    assert results["statistics"]["words"] == 18  # the work itself is still done


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({}, "path"),
        ({"path": ""}, "path"),
        ({"path": 5}, "path"),
        ({"path": "a.txt", "step_delay": -0.1}, "step_delay"),
        ({"path": "a.txt", "step_delay": "slow"}, "step_delay"),
        ({"path": "a.txt", "output_dir": ""}, "output_dir"),
        ({"path": "a.txt", "colour": "blue"}, "colour"),
        (["a.txt"], "data"),
        (None, "data"),
    ],
)
def test_the_schema_rejects_bad_data(data: Any, where: str) -> None:
    with pytest.raises(PipelineError) as caught:
        doc_pipeline.documents.validate_data(data)
    assert caught.value.reason == "invalid_data"
    assert where in str(caught.value)


def test_the_schema_accepts_good_data() -> None:
    doc_pipeline.documents.validate_data({"path": "a.txt"})
    doc_pipeline.documents.validate_data({"path": "a.txt", "output_dir": "r", "step_delay": 0})
    defaults = doc_pipeline.DocumentTask(path="a.txt")
    assert (defaults.output_dir, defaults.step_delay) == ("reports", 0.3)


def test_unreadable_input_fails_at_once(tmp_path: Path) -> None:
    """No retry can fix these, so the step raises PipelineError('invalid_data')."""
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"a " * (doc_pipeline.MAX_DOCUMENT_BYTES // 2 + 1))
    cases = {
        tmp_path / "missing.txt": "no such file",
        tmp_path: "is a directory",
        latin1: "not UTF-8",
        huge: "limited to 1 MiB",
    }
    for path, message in cases.items():
        with pytest.raises(PipelineError, match=message) as caught:
            run_steps({"path": str(path), "step_delay": 0}, until="read")
        assert caught.value.reason == "invalid_data"


def test_the_pipelines_load_by_import_path() -> None:
    service = PipelineService.from_import_paths(["examples.doc_pipeline", "examples.noop_pipeline"])
    assert set(service.pipelines) == {"documents", "noop"}
    assert service.resolve("documents").schema is doc_pipeline.DocumentTask
    noop = PipelineService.from_import_paths(["examples.noop_pipeline"]).resolve(None)
    assert noop is noop_pipeline.noop
    ctx = StepContext(task_id="n", data={}, results={}, attempt=1, queue="q", step="nothing")
    assert noop.steps[0].function(ctx) is None


def test_the_development_config_runs_the_documents_pipeline() -> None:
    from conveyor.settings import load_settings

    settings = load_settings(ROOT / "config" / "development.yaml")
    assert settings.worker.pipelines == ["examples.doc_pipeline"]


# -- the demo ---------------------------------------------------------------------------------


def _start_order(output: str) -> list[int]:
    match = re.search(r"^priorities in start order: ([\d ]+)$", output, re.MULTILINE)
    assert match, output
    return [int(p) for p in match.group(1).split()]


@pytest.mark.slow
def test_the_demo_runs_end_to_end() -> None:
    """``make run``: exits 0, every task started highest priority first, temp dir removed."""
    documents = sorted((ROOT / "examples" / "docs").glob("*.txt"))
    assert 8 <= len(documents) <= 12
    done = subprocess.run(
        [sys.executable, "scripts/demo.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    order = _start_order(done.stdout)
    assert len(order) == len(documents)
    assert order == sorted(order, reverse=True), order
    assert len(set(order)) < len(order)  # the batch has a tie, shown in push order
    assert "✓ highest priority first" in done.stdout
    assert "max_jobs" in done.stdout and "exited with code 0" in done.stdout
    assert done.stdout.count(" success ") == len(documents)
    removed = re.search(r"^\(removed (\S+);", done.stdout, re.MULTILINE)
    assert removed and not Path(removed.group(1)).exists()


@pytest.mark.slow
def test_the_demo_keeps_its_reports_in_dir(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    work.mkdir()
    (work / "keep.txt").write_text("not the demo's", encoding="utf-8")
    args = [sys.executable, "scripts/demo.py", "--dir", str(work), "--step-delay", "0.02"]
    for _ in range(2):  # the second run replaces the first run's database and reports
        done = subprocess.run(
            args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
    reports = sorted(p.stem for p in (work / "reports").glob("*.json"))
    assert reports == sorted(p.stem for p in (ROOT / "examples" / "docs").glob("*.txt"))
    assert (work / "demo.db").is_file() and (work / "keep.txt").is_file()
    tides = json.loads((work / "reports" / "tides.json").read_text(encoding="utf-8"))
    assert tides["statistics"]["top_keywords"][0]["word"] == "moon"
