"""How a process is told apart from another on this host: its pid *and* its start time, read right.

Issue 26, item 12: mutants of ``owner_alive`` ("same pid **or** same start time" for "this very
process") and of ``_proc_stat`` (a process name holding ``)``) survived the suite. Real processes:
siblings forked in the same clock tick (as a supervisor starts its workers), and a process that
names itself ``x) Z 1 (y) Z 2``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from walstate import ownership
from walstate.ownership import Identity, _proc_stat, owner_alive

#: A process name (at most 15 bytes) that reads like the end of a name, a zombie's state and more fields.
TRICKY_NAME = "x) Z 1 (y) Z 2"


def _start_tick(pid: int) -> str:
    """Field 22 of /proc/PID/stat (the start time), counted from the *last* ')' (the name may hold any)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _sibling_judges_sibling() -> tuple[bool, str] | None:
    """Fork two children back to back; the second judges the first by its owner token.

    Returns ``(alive, detail)`` when both started in the same clock tick, None when they did not
    (the caller tries again).
    """
    read_end, write_end = os.pipe()
    sleeper = os.fork()
    if sleeper == 0:  # pragma: no cover - the child
        os.close(read_end)
        os.close(write_end)
        time.sleep(60)
        os._exit(0)
    judge = os.fork()
    if judge == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.close(read_end)
            me = ownership.identity()  # recomputed in the forked child
            theirs = _start_tick(sleeper)
            if me.pid != os.getpid() or me.start != _start_tick(os.getpid()):
                os.write(write_end, b"identity not recomputed after fork")
                code = 4
            elif theirs != me.start:
                code = 2  # not the same tick: try again
            else:
                token = Identity(me.boot_id, me.pid_ns, me.host, sleeper, theirs).token("sibling")
                alive = owner_alive(token, 1, lease_expires=None, now=0.0)
                os.write(write_end, f"{int(alive)} {token}".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        _, status = os.waitpid(judge, 0)
        message = os.read(read_end, 4096).decode()
    finally:
        os.close(read_end)
        os.kill(sleeper, signal.SIGKILL)
        os.waitpid(sleeper, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2:
        return None
    assert code == 0, f"the judging child failed ({code}): {message}"
    alive, _, token = message.partition(" ")
    return alive == "1", token


def test_a_sibling_started_in_the_same_clock_tick_is_judged_by_its_own_pid_and_is_alive() -> None:
    # Same start time as the judge, another pid: another process (not "this very process", whose
    # registry of live runs would say it runs nothing), alive for as long as its pid lives.
    for _ in range(200):
        found = _sibling_judges_sibling()
        if found is not None:
            alive, token = found
            assert alive, f"a live sibling started in the judge's own clock tick was judged dead: {token}"
            return
    pytest.skip("no two forked children started in the same clock tick in 200 tries")


def test_a_process_whose_name_holds_parentheses_is_read_from_the_last_one() -> None:
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time\n"
                              f"open('/proc/self/comm', 'w').write({TRICKY_NAME!r})\n"
                              "print('named', flush=True)\n"
                              "time.sleep(60)\n"],
                             stdout=subprocess.PIPE, text=True)
    try:
        start = _start_tick(child.pid)  # read the same way, before and after it renames itself
        assert child.stdout is not None and child.stdout.readline().strip() == "named"
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == TRICKY_NAME
        stat = _proc_stat(child.pid)
        assert stat is not None
        assert stat[1] == start == _start_tick(child.pid), stat
        assert stat[0] in ("R", "S"), f"read the state from inside the name: {stat}"
        me = Identity.current()
        token = Identity(me.boot_id, me.pid_ns, me.host, child.pid, start).token("n")
        assert owner_alive(token, 1, lease_expires=None, now=0.0), "a live process named with ')' judged dead"
        # Another start time at that pid: a reused pid, so its owner is gone.
        other = Identity(me.boot_id, me.pid_ns, me.host, child.pid, str(int(start) + 1)).token("n")
        assert not owner_alive(other, 1, lease_expires=None, now=0.0)
        child.kill()
        child.wait()
        assert _proc_stat(child.pid) is None
        assert not owner_alive(token, 1, lease_expires=None, now=0.0)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_this_process_under_another_start_time_is_a_dead_predecessor_whose_pid_was_reused() -> None:
    # Our pid with another start time: the process that had it before us, long gone.
    me = ownership.identity()
    predecessor = Identity(me.boot_id, me.pid_ns, me.host, me.pid, str(int(me.start) - 1)).token(ownership.new_nonce())
    with ownership.Claiming(predecessor):
        assert not owner_alive(predecessor, 1, lease_expires=None, now=0.0)
    with ownership.LiveRun(predecessor, 1):
        assert not owner_alive(predecessor, 1, lease_expires=None, now=0.0)


def test_a_live_process_whose_name_is_not_utf8_is_judged_alive_by_its_pid_and_start_time() -> None:
    # A process may name itself with any bytes (prctl, /proc/self/comm): its stat line must still be read.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\n"
                              "open('/proc/self/comm', 'wb').write(b'w\\xff\\xfe) Z 9')\n"
                              "print('named', flush=True)\n"
                              "time.sleep(60)\n"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "named"
        assert b"\xff" in Path(f"/proc/{child.pid}/comm").read_bytes()
        stat = _proc_stat(child.pid)
        start = Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19].decode()
        assert stat is not None and stat[1] == start, stat
        assert stat[0] in ("R", "S"), f"read the state from inside the name: {stat}"
        me = Identity.current()
        token = Identity(me.boot_id, me.pid_ns, me.host, child.pid, start).token("n")
        assert owner_alive(token, 1, lease_expires=None, now=0.0), "a live process with a non-UTF-8 name judged dead"
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_a_token_without_a_boot_id_is_judged_by_its_lease_only_even_by_a_process_that_knows_none() -> None:
    # A container may hide /proc/sys/kernel/random/boot_id: then no pid can be trusted to be of this boot,
    # not even when the judge has no boot id either. A child whose boot_id reads empty (a bind mount) judges pid 1.
    code = ("from walstate.ownership import Identity, _proc_stat, identity, owner_alive\n"
            "me = identity()\n"
            "assert me.boot_id == '', me\n"
            "stat = _proc_stat(1)\n"
            "token = Identity('', me.pid_ns, me.host, 1, stat[1]).token('n')\n"
            "print(owner_alive(token, 1, lease_expires=None, now=0.0), owner_alive(token, 1, lease_expires=1e12, now=0.0))\n")
    shell = f"mount --bind /dev/null /proc/sys/kernel/random/boot_id && exec {sys.executable} -c \"$0\""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, code],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if done.returncode != 0 and ("unshare" in done.stderr or "mount" in done.stderr):
        pytest.skip(f"cannot hide the boot id here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"], "a token with no boot id was judged by its pid"
