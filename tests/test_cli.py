"""The ``conveyor`` command line against SQLite and Redis: every subcommand and its errors.

Most tests call ``main(argv)`` in-process and read stdout/stderr with capsys; a few run the
installed ``conveyor`` script in a subprocess to prove the entry point (and real signals).
Errors must be one line on stderr starting ``conveyor:``, a non-zero exit, no traceback.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import HELPERS, wait_until
from conveyor import QueueManager
from conveyor.cli import main

CONVEYOR = Path(sys.executable).parent / "conveyor"


@pytest.fixture(autouse=True)
def _no_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where no config/development.yaml exists: defaults plus the flags under test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVEYOR_CONFIG", raising=False)
    monkeypatch.delenv("CONVEYOR_URL", raising=False)


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], backend_url: str, queue_name: str) -> Run:
    """``cli("push", "{}")`` runs ``main`` with ``--url`` and ``--queue`` for this test."""

    def run(*argv: str, queue: bool = True) -> tuple[int, str, str]:
        args = [*argv, "--url", backend_url]
        if queue:
            args += ["--queue", queue_name]
        code = main(args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("conveyor: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_letter(queue: QueueManager, *ids: str) -> None:
    """Drive tasks into the failed (dead-letter) list the way a worker does."""
    for task_id in ids:
        assert queue.push(task_id, {"n": task_id}, 5)
    for _ in ids:
        message = queue.reserve(timeout=1)
        assert message is not None
        assert queue.fail(message, reason="error", error=RuntimeError("boom"))


# -- push -----------------------------------------------------------------------------------


def test_push_prints_the_id_and_task_show_displays_the_record(
    cli: Run, queue: QueueManager
) -> None:
    code, out, err = cli("push", '{"doc": "a.txt"}', "--priority", "9", "--type", "ops")
    assert code == 0, err
    task_id = out.strip()
    record = queue.require_task(task_id)
    assert (record.priority, record.type, record.data) == (9, "ops", {"doc": "a.txt"})

    code, out, err = cli("push", "{}", "--id", "later", "--delay", "60", "--max-retries", "2")
    assert (code, out.strip()) == (0, "later")
    assert queue.require_task("later").status.value == "scheduled"
    assert queue.require_task("later").max_retries == 2

    code, out, _ = cli("task", "show", task_id)
    assert code == 0
    assert f"id:            {task_id}" in out
    assert "status:        pending" in out
    assert '{"doc": "a.txt"}' in out
    assert "history:" in out
    code, out, _ = cli("task", "show", task_id, "--json")
    assert code == 0
    assert json.loads(out)["priority"] == 9


def test_push_data_from_a_file_and_from_stdin(
    cli: Run, queue: QueueManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data.json").write_text('{"audio_files": ["meeting.wav"]}')
    code, _, _ = cli("push", "@data.json", "--id", "f1")
    assert code == 0
    assert queue.require_task("f1").data == {"audio_files": ["meeting.wav"]}
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"from": "stdin"}'))
    code, _, _ = cli("push", "@-", "--id", "s1")
    assert code == 0
    assert queue.require_task("s1").data == {"from": "stdin"}


def test_push_errors_are_one_line(cli: Run, queue: QueueManager) -> None:
    code, _, err = cli("push", "{bad json")
    assert code == 2
    one_line_error(err, "not valid JSON")
    code, _, err = cli("push", "{}", "--priority", "11")
    assert code == 2
    one_line_error(err, "priority")
    code, _, err = cli("push", "{}", "--priority", "high")
    assert code == 2
    one_line_error(err, "--priority")
    code, _, err = cli("push", "@missing.json")
    assert code == 2
    one_line_error(err, "missing.json")
    assert cli("push", "{}", "--id", "dup")[0] == 0
    code, _, err = cli("push", "{}", "--id", "dup")
    assert code == 1
    one_line_error(err, "dup", "already")
    assert queue.get_queue_length() == 1


def test_push_many_from_json_lines_and_a_json_list(
    cli: Run, queue: QueueManager, tmp_path: Path
) -> None:
    lines = [json.dumps({"id": f"j{i}", "data": {"i": i}}) for i in range(1200)]
    lines.insert(3, "")
    lines.append(json.dumps({"id": "urgent", "data": {}, "priority": 10}))
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = cli("push", "@tasks.jsonl", "--many", "--priority", "2", "--batch-size", "500")
    assert code == 0, err
    assert "pushed 1201 of 1201" in out
    assert queue.get_queue_length() == 1201
    assert queue.require_task("j7").priority == 2  # the flag is the default
    assert queue.require_task("urgent").priority == 10  # the task's own value wins

    code, out, _ = cli("push", "@tasks.jsonl", "--many")
    assert code == 0
    assert "pushed 0 of 1201" in out and "1201 already queued" in out

    (tmp_path / "list.json").write_text(json.dumps([{"data": 1}, {"data": 2, "type": "ops"}]))
    code, out, _ = cli("push", "@list.json", "--many")
    assert (code, "pushed 2 of 2" in out) == (0, True)


def test_push_many_rejects_a_bad_task_before_writing_any(
    cli: Run, queue: QueueManager, tmp_path: Path
) -> None:
    (tmp_path / "bad.jsonl").write_text('{"data": 1}\n\n{"data": 2, "priority": 99}\n')
    code, _, err = cli("push", "@bad.jsonl", "--many")
    assert code == 2
    one_line_error(err, "line 3", "priority", "nothing was pushed")
    (tmp_path / "nodata.jsonl").write_text('{"data": 1}\n{"id": "x"}\n')
    code, _, err = cli("push", "@nodata.jsonl", "--many")
    assert code == 2
    one_line_error(err, "line 2", "'data'")
    (tmp_path / "garbage.jsonl").write_text('{"data": 1}\nnot json\n')
    code, _, err = cli("push", "@garbage.jsonl", "--many")
    assert code == 2
    one_line_error(err, "line 2", "not valid JSON")
    assert queue.stats().counts["pending"] == 0


# -- status, queues -------------------------------------------------------------------------


def test_status_of_one_queue_and_of_all(cli: Run, queue: QueueManager, queue_name: str) -> None:
    queue.push("a", {}, 5)
    queue.push("b", {}, 5, delay=60)
    dead_letter(queue, "c")
    message = queue.reserve(timeout=1)
    assert message is not None
    queue.ack(message, result={"ok": True})

    code, out, _ = cli("status")
    assert code == 0
    header, row = out.splitlines()[2:4]
    assert header.split()[:8] == [
        "QUEUE", "PENDING", "SCHEDULED", "PROCESSING", "SUCCESS", "FAILED", "CANCELED", "TIMEOUT",
    ]  # fmt: skip
    assert row.split()[:8] == [queue_name, "0", "1", "0", "1", "1", "0", "0"]

    code, out, _ = cli("status", "--json")
    snapshot = json.loads(out)
    assert [q["queue"] for q in snapshot["queues"]] == [queue_name]
    counts = snapshot["queues"][0]["counts"]
    assert (counts["scheduled"], counts["success"], counts["failed"]) == (1, 1, 1)
    assert snapshot["queues"][0]["done_last_minute"] == 1

    code, out, _ = cli("status", queue=False)  # every queue on the backend
    assert code == 0
    assert any(line.split()[:1] == [queue_name] for line in out.splitlines())
    code, out, _ = cli("queues", queue=False)
    assert code == 0
    assert any(line.split()[:2] == [queue_name, "0"] for line in out.splitlines())


def test_status_watch_refreshes_until_ctrl_c(backend_url: str, queue: QueueManager) -> None:
    proc = subprocess.Popen(
        [str(CONVEYOR), "status", "--url", backend_url, "--queue", queue.queue_name, "--watch",
         "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(12)]  # two refreshes at least
        assert sum(line.startswith("Conveyor status:") for line in seen) >= 2
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
    assert "Traceback" not in err


# -- task cancel / retry, dead list / retry / purge, clear ----------------------------------


def test_task_cancel_and_retry(cli: Run, queue: QueueManager) -> None:
    queue.push("t1", {}, 5)
    code, out, _ = cli("task", "cancel", "t1")
    assert (code, "canceled" in out) == (0, True)
    assert queue.require_task("t1").status.value == "canceled"
    code, _, err = cli("task", "cancel", "t1")
    assert code == 1
    one_line_error(err, "canceled", "nothing to cancel")
    code, out, _ = cli("task", "retry", "t1")
    assert code == 0
    assert queue.require_task("t1").status.value == "pending"
    code, _, err = cli("task", "retry", "t1")
    assert code == 1
    one_line_error(err, "pending")
    for action in ("show", "cancel", "retry"):
        code, _, err = cli("task", action, "no-such-task")
        assert code == 1
        one_line_error(err, "no-such-task")


def test_dead_list_retry_and_purge(cli: Run, queue: QueueManager) -> None:
    dead_letter(queue, "d1", "d2", "d3", "d4")
    code, out, _ = cli("dead", "list")
    assert code == 0
    assert out.splitlines()[0].startswith("4 failed task(s)")
    assert "RuntimeError: boom" in out and "d3" in out
    code, out, _ = cli("dead", "list", "--json", "--limit", "2")
    assert len(json.loads(out)) == 2

    code, _, _ = cli("dead", "retry", "d1")
    assert code == 0
    assert queue.require_task("d1").status.value == "pending"
    code, _, err = cli("dead", "retry", "d1")
    assert code == 1
    one_line_error(err, "pending")
    code, out, _ = cli("dead", "retry", "--all")
    assert (code, "re-queued 3 of 3" in out) == (0, True)
    assert queue.stats().counts["pending"] == 4

    for _ in range(4):
        message = queue.reserve(timeout=1)
        assert message is not None
        queue.fail(message, reason="error", error="again")
    code, _, err = cli("dead", "purge")  # stdin is not a terminal: refuse without --yes
    assert code == 2
    one_line_error(err, "--yes")
    assert queue.stats().counts["failed"] == 4
    code, out, _ = cli("dead", "purge", "--yes")
    assert (code, "purged 4" in out) == (0, True)
    assert queue.stats().counts["failed"] == 0
    assert queue.get_task("d1") is None


def test_clear_asks_on_a_terminal_and_refuses_without_one(
    cli: Run, queue: QueueManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue.push("c1", {}, 5)
    code, _, err = cli("clear")
    assert code == 2
    one_line_error(err, "--yes")
    assert queue.get_queue_length() == 1

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, _, err = cli("clear")
    assert code == 1
    assert "[y/N]" in err and queue.get_queue_length() == 1
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, _ = cli("clear")
    assert (code, "1 task(s) deleted" in out) == (0, True)
    assert queue.get_task("c1") is None
    queue.push("c2", {}, 5)
    assert cli("clear", "--yes")[0] == 0
    assert queue.get_queue_length() == 0


# -- workers and stop -----------------------------------------------------------------------


def test_workers_lists_heartbeats_and_stop_asks_one(
    cli: Run, queue: QueueManager, queue_name: str, backend_name: str
) -> None:
    worker_id = f"cli-test-{queue_name}"
    info = {
        "id": worker_id, "host": "host-a", "pid": 4242, "queues": [queue_name],
        "state": "running", "processed": 7, "failed": 1, "started_at": 1.0,
        "last_seen": 1.0, "current": [{"task_id": "t9", "step": "transcribe"}],
    }  # fmt: skip
    try:
        assert queue.register_worker(worker_id, info, ttl=60) is False
        code, out, _ = cli("workers")
        assert code == 0
        row = next(line for line in out.splitlines() if line.startswith(worker_id))
        assert row.split()[1:5] == ["host-a", "4242", queue_name, "running"]
        assert "t9 (transcribe)" in row
        code, out, _ = cli("workers", "--json")
        assert any(entry["id"] == worker_id for entry in json.loads(out))

        code, out, _ = cli("stop", worker_id, queue=False)
        assert (code, "asked 1 worker(s)" in out) == (0, True)
        assert queue.register_worker(worker_id, info, ttl=60) is True  # it hears the request
        code, _, err = cli("stop", "no-such-worker", queue=False)
        assert code == 1
        one_line_error(err, "no-such-worker")
        if backend_name == "sqlite":  # "stop all" on a shared Redis would stop other tests' workers
            code, out, _ = cli("stop", "--all", queue=False)
            assert (code, "asked 1 worker(s)" in out) == (0, True)
    finally:
        queue.unregister_worker(worker_id)


def test_stop_needs_an_id_all_or_a_queue_and_q_stops_only_that_queues_workers(
    cli: Run, queue: QueueManager, queue_name: str
) -> None:
    other = f"{queue_name}-other"
    serving = {
        f"{queue_name}-a": [queue_name],
        f"{queue_name}-b": [other, queue_name],  # serves it as its second choice
        f"{queue_name}-c": [other],
    }

    def beat(worker_id: str) -> bool:
        info = {"id": worker_id, "host": "h", "pid": 1, "queues": serving[worker_id]}
        return queue.register_worker(worker_id, info, ttl=60)

    try:
        assert not any(beat(worker_id) for worker_id in serving)
        code, out, err = cli("stop", queue=False)
        assert (code, out) == (2, "")
        one_line_error(err, "WORKER_ID", "-Q QUEUE", "--all")
        code, _, err = cli("stop", f"{queue_name}-a", "--all", queue=False)
        assert code == 2
        one_line_error(err, "not both")
        assert not any(beat(worker_id) for worker_id in serving)  # nobody was asked

        code, out, _ = cli("stop", "-Q", queue_name, queue=False)
        assert code == 0 and f"asked 2 worker(s) serving '{queue_name}'" in out
        asked = {worker_id: beat(worker_id) for worker_id in serving}
        assert asked == {f"{queue_name}-a": True, f"{queue_name}-b": True, f"{queue_name}-c": False}
    finally:
        for worker_id in serving:
            queue.unregister_worker(worker_id)


# -- settings and broker errors -------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["push", "{}"], ["workers"], ["dead", "list"]])
def test_an_unreachable_broker_is_one_line_and_exit_2(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    code = main([*command, "--url", url])
    err = capsys.readouterr().err
    assert code == 2
    one_line_error(err, "cannot reach Redis", "***")
    assert "s3cret" not in err


def test_configuration_and_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["status", "--config", "nowhere.yaml"]) == 2
    one_line_error(capsys.readouterr().err, "nowhere.yaml")
    (tmp_path / "typo.yaml").write_text("queue:\n  nmae: x\nworker:\n  concurrency: 0\n")
    assert main(["status", "--config", "typo.yaml"]) == 2
    one_line_error(capsys.readouterr().err, "queue.nmae", "worker.concurrency")
    assert main(["status", "--url", "mysql://localhost/db"]) == 2
    one_line_error(capsys.readouterr().err, "mysql")
    assert main(["frobnicate"]) == 2
    one_line_error(capsys.readouterr().err, "frobnicate")
    assert main(["dead", "retry"]) == 2
    one_line_error(capsys.readouterr().err)
    assert main(["push", "--help"]) == 0
    assert "--priority" in capsys.readouterr().out


# -- the installed script -------------------------------------------------------------------


def run_script(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONVEYOR), *argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_console_script_runs_commands_and_reports_errors(
    backend_url: str, queue: QueueManager, tmp_path: Path
) -> None:
    done = run_script("--help", cwd=tmp_path)
    assert done.returncode == 0 and "doctor" in done.stdout
    done = run_script("push", '{"n": 1}', "--url", backend_url, "-q", queue.queue_name,
                      cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert queue.require_task(done.stdout.strip()).data == {"n": 1}
    done = run_script("push", "[oops", "--url", backend_url, cwd=tmp_path)
    assert done.returncode == 2
    one_line_error(done.stderr, "not valid JSON")
    done = run_script("task", "show", "nope", "--url", backend_url, cwd=tmp_path)
    assert done.returncode == 1
    one_line_error(done.stderr, "nope")


def test_conveyor_worker_runs_tasks_and_exits_0_on_sigterm(
    backend_url: str, queue: QueueManager, tmp_path: Path
) -> None:
    queue.push("w1", {"sleep": 0}, 5)
    queue.push("w2", {"fail": True}, 5)
    env = {**os.environ, "PYTHONPATH": str(HELPERS), "CONVEYOR_WORKER__HEARTBEAT_INTERVAL": "0.5"}
    proc = subprocess.Popen(
        [str(CONVEYOR), "worker", "--url", backend_url, "-Q", queue.queue_name, "-c", "2",
         "-P", "ops_pipeline", "--max-jobs", "100", "--log-level", "INFO"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: (
                queue.require_task("w1").status.value == "success"
                and queue.require_task("w2").status.value == "failed"
            ),
            timeout=30,
            message="the worker to settle both tasks",
        )
        live = wait_until(lambda: [w for w in queue.workers() if w.get("pid") == proc.pid], 10)
        assert live[0]["concurrency"] == 2 and live[0]["queues"] == [queue.queue_name]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "stopped (SIGTERM)" in err
    assert "Traceback" not in err.split("asked to fail")[-1]
