"""The cluster helpers that need no cluster: SLURM host lists, time left, rendezvous, the stop request, the
straggler verdict, and the launch script's reading of exit statuses (real processes, real signals)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT
from esvit_scale.cluster.slurm import expand_nodelist, parse_time_left, rendezvous_from_slurm


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x-gpu[003-004],y", ["x-gpu003", "x-gpu004", "y"]),
])
def test_slurm_host_lists_expand_in_order(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("text, seconds", [
    ("4:59", 299), ("1:00:00", 3600), ("2-03:04:05", ((2 * 24 + 3) * 60 + 4) * 60 + 5),
    ("UNLIMITED", None), ("INVALID", None), ("", None)])
def test_squeue_time_left_is_read(text, seconds):
    assert parse_time_left(text) == seconds


def test_rendezvous_is_the_first_node_and_a_port_that_changes_on_requeue():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[12-13]"}
    addr, port = rendezvous_from_slurm(env)
    assert addr == "gpu12" and 20000 <= port < 40000
    assert rendezvous_from_slurm({**env, "SLURM_RESTART_COUNT": "1"})[1] != port
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        rendezvous_from_slurm({"SLURM_JOB_ID": "1"})


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)


def test_a_multi_node_job_without_a_rendezvous_address_stops_with_what_to_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2", RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, "-c", "from esvit_scale.engine.distributed import prepare_environment; "
                           "prepare_environment('cpu')"], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "spans several nodes but MASTER_ADDR is not set" in proc.stderr


def test_a_signal_in_start_up_exits_75_even_while_the_main_thread_is_blocked(tmp_path):
    """The main thread sleeps (as in a rendezvous or a JIT build); the signal still ends the process with 75 and
    the exit is recorded for the launcher."""
    status = tmp_path / "status"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import time
        from esvit_scale.cluster.signals import StopRequest
        StopRequest().install()
        print("ready", flush=True)
        time.sleep(60)
        """)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ESVIT_EXIT_STATUS_FILE": str(status), "RANK": "3",
             "WORLD_SIZE": "4"})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75 and "SIGUSR1 during start-up" in err
    assert status.read_text().startswith("75 rank=3 world_size=4 SIGUSR1 during start-up")


def test_a_critical_write_finishes_before_the_start_up_exit(tmp_path):
    out = tmp_path / "written"
    proc = _run_python(f"""
        import os, signal, time
        from esvit_scale.cluster.signals import StopRequest
        stop = StopRequest().install()
        with stop.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
            open({str(out)!r}, "w").write("whole")
        time.sleep(30)
        """, {})
    assert proc.returncode == 75 and out.read_text() == "whole"


def test_after_training_started_a_signal_only_sets_the_flag_and_after_finished_it_is_ignored():
    proc = _run_python("""
        import os, signal, time
        from esvit_scale.cluster.signals import StopRequest
        stop = StopRequest().install()
        stop.training_started()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print("requested", stop.requested, stop.reason())
        stop.finished()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print("alive")
        """, {})
    assert proc.returncode == 0, proc.stderr
    assert "requested True signal SIGTERM" in proc.stdout and "alive" in proc.stdout


def test_the_time_limit_deadline_is_a_stop_request():
    from esvit_scale.cluster.signals import StopRequest
    stop = StopRequest()
    assert not stop.requested
    stop.deadline = 0.0
    assert stop.requested and "time limit" in stop.reason()


def test_a_persistently_slow_rank_is_named_once_its_streak_is_long_enough(caplog):
    import torch

    from esvit_scale.cluster.stragglers import PATIENCE, StragglerMonitor
    monitor = StragglerMonitor(every=1, factor=1.3, rank=0, world_size=1, device=torch.device("cpu"))
    monitor.world_size, monitor.hosts, monitor._slow_streak = 4, ["h0", "h1", "h2", "h3"], [0] * 4
    for i in range(PATIENCE):
        with caplog.at_level("WARNING"):
            result = monitor._judge(i, [1.0, 1.0, 2.0, 1.05])
        assert result["slowest_rank"] == 2 and result["slowest_over_median"] == pytest.approx(2.0 / 1.025)
        named = [r for r in caplog.records if "straggler: rank 2 on h2" in r.getMessage()]
        assert bool(named) == (i == PATIENCE - 1)
    monitor._judge(PATIENCE, [1.0, 1.0, 1.0, 1.0])
    assert monitor._slow_streak == [0, 0, 0, 0]


@pytest.mark.parametrize("ranks, command_rc, expected", [
    (["75 rank=0 world_size=2 x", "75 rank=1 world_size=2 x"], 1, 75),   # torchrun's 1 over workers' 75
    (["75 rank=0 world_size=2 x"], 1, 1),                                 # one rank only: a real failure
    (["75 rank=0 world_size=2 x", "69 rank=1 world_size=2 lost"], 1, 1),
    ([], 75, 75), ([], 0, 0), ([], 3, 3)])
def test_launch_reads_the_ranks_statuses_when_the_launcher_reports_its_own(ranks, command_rc, expected):
    lines = "".join(f"echo '{r}' >> \"$ESVIT_EXIT_STATUS_FILE\"; " for r in ranks)
    proc = subprocess.run(["bash", "slurm/launch.sh", "bash", "-c", f"{lines} exit {command_rc}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == expected, proc.stderr


def test_launch_forwards_the_signal_and_waits_for_orphaned_workers(tmp_path):
    """A 'launcher' that dies of SIGUSR1 while its 'worker' (registered in the pids file, as trainers do) still
    writes for 2 s: launch.sh forwards the signal, waits for the worker, and reads the worker's 75."""
    done, ready = tmp_path / "done", tmp_path / "ready"
    script = textwrap.dedent(f"""
        ( trap '' USR1; echo $BASHPID >> "$ESVIT_EXIT_STATUS_FILE.pids"; touch {ready}; sleep 2; echo saved > {done}
          echo "75 rank=0 world_size=1 saved" >> "$ESVIT_EXIT_STATUS_FILE" ) &
        sleep 60
        """)
    proc = subprocess.Popen(["bash", "slurm/launch.sh", "bash", "-c", script], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    assert "started pid" in proc.stderr.readline()
    while not ready.exists():
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    err = proc.communicate(timeout=60)[1]
    assert "USR1 received: forwarding" in err
    assert done.read_text().strip() == "saved" and proc.returncode == 75, err
