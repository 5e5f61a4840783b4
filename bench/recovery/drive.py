"""bench/recovery driver: the same kill on both sides, in one run (see README.md).

contrail: a coordinator and 3 `contrail worker` processes (cluster.min_workers = 2, audit on)
on synthetic 16x16 images; after step KILL_AT one worker is SIGKILLed; measured: seconds from
the kill to the first step the survivors commit afterwards (from /status, polled every 10 ms),
and what `contrail audit check` says about lost or repeated samples.

torchrun: bench/recovery/torch_elastic.py (DDP, gloo) under `torchrun --max-restarts 3` with a
checkpoint every 50 steps; the same kill; measured: seconds from the kill to the first step
after the restart, and the steps redone (trained before the kill, lost with the restart).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what, give_up=False):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    if give_up:
        return None
    sys.exit(f"timed out waiting for {what}")


JOB = """
[data]
url = "file://{data}"
image_size = 16
[data.augment]
crop_scale_min = 0.5
grayscale_p = 0.0
blur_p = 0.0
[model]
layers = [1, 1]
width = 8
projector_hidden = 32
projector_out = 16
[optim]
lr = 0.2
warmup_steps = 5
[train]
global_batch = 48
micro_batch = 8
epochs = 8
log_every = 1000
[cluster]
world_size = 3
min_workers = 2
heartbeat_ms = 200
worker_timeout_ms = 2000
lease_ttl_ms = 3000
collective_timeout_ms = 20000
[checkpoint]
url = ""
[audit]
url = "file://{audit}"
flush_every_steps = 1
"""


def contrail_side(binary, work, kill_at):
    data, audit = os.path.join(work, "data"), os.path.join(work, "audit")
    subprocess.run([binary, "data", "synth", "--out", f"file://{data}", "--samples", "2048",
                    "--shard-size", "64", "--image-size", "16"], check=True,
                   stdout=subprocess.DEVNULL)
    job = os.path.join(work, "job.toml")
    with open(job, "w") as f:
        f.write(JOB.format(data=data, audit=audit))
    grpc, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env["CONTRAIL_JOB_TOKEN"] = subprocess.run([binary, "token"], check=True,
                                               capture_output=True, text=True).stdout.strip()
    log = open(os.path.join(work, "contrail.log"), "w")
    coord = subprocess.Popen([binary, "coordinator", "--config", job,
                              "--set", f"cluster.grpc_addr={grpc}",
                              "--set", f"cluster.http_addr={http}"],
                             env=env, stdout=log, stderr=log)
    workers = [subprocess.Popen([binary, "worker", "--coordinator", f"http://{grpc}",
                                 "--threads", "1"], env=env, stdout=log, stderr=log)
               for _ in range(3)]

    def status():
        try:
            with urllib.request.urlopen(f"http://{http}/status", timeout=2) as r:
                return json.load(r)
        except OSError:
            return None

    s0 = wait_for(lambda: (s := status()) and s["step"] >= kill_at and s, 300, "step KILL_AT")
    workers[2].send_signal(signal.SIGKILL)
    killed = time.time()
    step_at_kill, gen = s0["step"], s0["generation"]
    wait_for(lambda: (s := status()) and s["generation"] > gen and s["step"] > step_at_kill, 120,
             "the survivors' next step")
    recovered = time.time() - killed
    end = wait_for(lambda: (s := status()) and s["state"] in ("finished", "failed") and s, 600,
                   "the end of the job")
    for w in workers[:2]:
        w.wait(timeout=60)
    coord.wait(timeout=60)
    check = subprocess.run([binary, "audit", "check", "--audit", f"file://{audit}",
                            "--data", f"file://{data}"], capture_output=True, text=True)
    return {
        "state": end["state"],
        "step_at_kill": step_at_kill,
        "seconds_to_next_step": recovered,
        "audit_exactly_once": check.returncode == 0,
        "audit": check.stdout.strip().splitlines(),
    }


def torch_side(py_bin, work, kill_at):
    out = os.path.join(work, "torch")
    os.makedirs(out)
    port = free_port()
    torchrun = os.path.join(os.path.dirname(py_bin), "torchrun")
    log = open(os.path.join(out, "torchrun.log"), "w")
    run = subprocess.Popen([torchrun, "--nproc-per-node", "3", "--max-restarts", "3",
                            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                            "bench/recovery/torch_elastic.py", "--out", out, "--steps", "344",
                            "--checkpoint-every", "50"], stdout=log, stderr=subprocess.STDOUT)
    steps_log = os.path.join(out, "steps.log")

    def steps():
        try:
            with open(steps_log) as f:
                return [(int(l.split()[1]), float(l.split()[2])) for l in f if l.startswith("STEP")]
        except OSError:
            return []

    wait_for(lambda: (st := steps()) and st[-1][0] >= kill_at, 300, "torch step KILL_AT")
    with open(os.path.join(out, "pid-2")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    killed = time.time()
    step_at_kill = max(s for s, t in steps() if t <= killed)
    # torchrun gives up after --max-restarts failed restarts: then there is no next step.
    after = wait_for(lambda: [x for x in steps() if x[1] > killed] or run.poll() is not None,
                     300, "torch's next step", give_up=True)
    if after is True or after is None:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
            # The elastic agent's workers do not die with it.
            for r in range(3):
                try:
                    with open(os.path.join(out, f"pid-{r}")) as f:
                        os.kill(int(f.read()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        return {"exit": run.poll(), "step_at_kill": step_at_kill, "recovered": False,
                "why": "every restart failed" if after else "no step within 300 s of the kill"}
    # Back where it was when the kill came (the redone steps are not progress).
    caught_up = wait_for(lambda: [x for x in steps() if x[1] > killed and x[0] > step_at_kill],
                         300, "torch back at the killed step")
    run.wait(timeout=600)
    resumed = [int(l.split()[1]) for l in open(os.path.join(out, "torchrun.log"))
               if l.startswith("RESUMED")]
    return {
        "exit": run.returncode,
        "recovered": True,
        "step_at_kill": step_at_kill,
        "seconds_to_next_step": after[0][1] - killed,
        "seconds_to_new_progress": caught_up[0][1] - killed,
        "resumed_from_step": resumed[-1] if resumed else 0,
        "steps_redone": step_at_kill - (resumed[-1] if resumed else 0),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contrail", required=True)
    ap.add_argument("--kill-at", type=int, default=75)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="contrail-recovery-")
    c = contrail_side(a.contrail, work, a.kill_at)
    print(json.dumps({"contrail": c}, indent=1), flush=True)
    print(f"contrail: {c['seconds_to_next_step']:.2f} s from the kill to the next committed step, "
          f"audit exactly once: {c['audit_exactly_once']}, job {c['state']}", flush=True)
    t = torch_side(sys.executable, work, a.kill_at)
    print(json.dumps({"torchrun": t}, indent=1))
    if not t["recovered"]:
        print(f"torchrun: did not recover (exit {t['exit']}): {t['why']}")
        subprocess.run(["rm", "-rf", work])
        return
    print(f"torchrun: {t['seconds_to_next_step']:.2f} s to its next step, "
          f"{t['seconds_to_new_progress']:.2f} s to a step it had not trained before; "
          f"{t['steps_redone']} steps redone ({t['steps_redone'] * 48} samples trained twice), "
          f"exit {t['exit']}")
    print(f"speed ratio torchrun/contrail: {t['seconds_to_next_step'] / c['seconds_to_next_step']:.1f}x")
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
