"""Sharded trainer ranks (``--trainer-ranks R``): R processes under torch.distributed, the model wrapped with
FSDP2 (``torch.distributed.fsdp.fully_shard``), data-parallel over each step's rows.

    rank 0 (the process you started: the driver, rollouts, logging, checkpoints, weight publishing)
      -> starts ranks 1..R-1 (``python -m tether.dist.ranks``, MASTER_ADDR 127.0.0.1, the store's port)
      -> for every use of the sharded model: a command through the store, then the collective work, on all ranks
    ranks 1..R-1: build the same Run without a run directory, engine use, rewards or loggers, and obey commands

Every rank runs the same :class:`tether.train.run.Run` code on the same inputs (rank 0 broadcasts each step's
scored batch), so everything a step computes (pi_old, advantages, meter, mismatch control) is identical on every
rank; only the update phase differs: each rank takes its slice of every micro-batch and the loss keeps the
normalisers of the whole mini-batch, so the gradients the ranks reduce-scatter (summed: the divide factor is 1)
are the single-process gradient (tether/train/update.py).

A follower waits for the next command on the c10d store (no timeout: rank 0 may generate for minutes between
steps), never inside a collective; collectives themselves run under ``sync_timeout_s``. A rank that dies makes
rank 0's next collective fail (gloo reports the closed connection at once; a hung rank trips the timeout), and
rank 0 raises :class:`TrainerRankFailed` naming it. A follower exits when rank 0's store goes away or rank 0's
process is gone. Checkpoints are gathered to rank 0 as full, unsharded state dicts in the single-process format,
so they load into any rank count (docs/distributed.md).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tether.train.errors import TrainingStopped

KILL_RANK_ENV = "TETHER_DIST_TEST_KILL_RANK"
"""Test hook (issue 16, trainer rank failure): ``RANK,STEP`` makes that rank SIGKILL itself on step STEP's batch;
``RANK,STEP,hang`` makes it SIGSTOP itself there instead (alive, never answering)."""
LEADER_PID_ENV = "TETHER_LEADER_PID"
TIMEOUT_ENV = "TETHER_RANK_TIMEOUT_S"
"""The collectives' timeout (sync_timeout_s) for ranks started before they can read the config."""
STARTUP_TIMEOUT_S = 600.0
"""How long rank 0 waits for the others to start and build their model (importing torch on a loaded machine takes
seconds, rank 0's warm start minutes): a barrier on the store, apart from the collectives' ``sync_timeout_s``;
a rank that exits meanwhile is reported at once."""
COMMANDS = ("learn", "full_state", "policy_logprobs", "restore")
"""What rank 0 asks of the others: the Run methods that touch the sharded model."""
STOP = "stop"


class TrainerRankFailed(TrainingStopped):
    """A trainer rank died or stopped answering; the message names it and the checkpoint a resume starts from."""


class Ranks:
    """This process's place in the trainer group: ``rank`` of ``world``, the store that carries commands, and
    the follower processes rank 0 started (empty on followers, and under an external launcher)."""

    def __init__(self, rank: int, world: int, store: dist.Store, timeout_s: float,
                 procs: dict[int, subprocess.Popen] | None = None, logs: dict[int, Path] | None = None) -> None:
        self.rank, self.world, self.store, self.timeout_s = rank, world, store, timeout_s
        self.procs, self.logs = procs or {}, logs or {}
        self.n_commands = 0
        self.mesh = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- commands ------------------------------------------------------------------------------------
    def command(self, name: str, payload: Any = None) -> None:
        """Rank 0: tell every follower to run ``name`` with ``payload`` (the store carries the name, a broadcast
        the payload)."""
        assert self.leader and (name in COMMANDS or name == STOP), name
        self.store.set(f"tether/cmd/{self.n_commands}", name)
        self.n_commands += 1
        if name != STOP:
            with self.guard(f"sending '{name}'"):
                dist.broadcast_object_list([payload], src=0)

    def receive(self) -> tuple[str, Any]:
        """A follower: the next command (waits without a timeout; raises when rank 0's store is gone)."""
        key = f"tether/cmd/{self.n_commands}"
        self.store.wait([key], datetime.timedelta(days=365))
        name = self.store.get(key).decode()
        self.n_commands += 1
        if name == STOP:
            return name, None
        box = [None]
        dist.broadcast_object_list(box, src=0)
        return name, box[0]

    @contextmanager
    def guard(self, what: str, note: str = "") -> Iterator[None]:
        """Rank 0: turn a failed collective into :class:`TrainerRankFailed` naming the rank that died (a dead
        process found within a few seconds), or the one that did not answer in time."""
        try:
            yield
        except TrainingStopped:  # a rank failure already named, or a stop every rank takes together
            raise
        except Exception as e:
            if not self.leader:
                raise
            dead = self._dead_ranks(wait_s=2.0)  # a killed rank is seen at once; a hung one never
            if not dead and not _collective_error(e):
                raise
            who = (", ".join(f"trainer rank {r} (pid {self.procs[r].pid}) {_exit_text(code)}"
                             + self._log_tail(r) for r, code in dead)
                   if dead else f"a trainer rank did not answer within {self.timeout_s:g} s (sync_timeout_s)")
            raise TrainerRankFailed(f"{who}, while {what}: {str(e).splitlines()[0][:300]}. {note}".strip()) from e

    def barrier(self, name: str) -> None:
        """Every rank reaches ``name`` (through the store, not a collective: no ``sync_timeout_s`` here). Rank 0
        watches the processes it started and names one that exits first."""
        self.store.set(f"tether/{name}/{self.rank}", "1")
        keys = [f"tether/{name}/{r}" for r in range(self.world)]
        if not self.leader:
            self.store.wait(keys, datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
            return
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.store.check(keys):
            dead = self._dead_ranks(wait_s=0.0)
            if dead or time.monotonic() > deadline:
                who = (", ".join(f"trainer rank {r} {_exit_text(code)}{self._log_tail(r)}" for r, code in dead)
                       if dead else f"a trainer rank did not start within {STARTUP_TIMEOUT_S:g} s")
                raise TrainerRankFailed(f"{who}, while starting the trainer ranks ({name})")
            time.sleep(0.05)

    def _dead_ranks(self, wait_s: float) -> list[tuple[int, int]]:
        deadline = time.monotonic() + wait_s
        while True:
            dead = [(r, p.returncode) for r, p in sorted(self.procs.items()) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.05)

    def _log_tail(self, rank: int) -> str:
        log = self.logs.get(rank)
        if log is None or not log.exists():
            return ""
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return f" (its log {log}: {lines[-1][:200]})" if lines else f" (its log: {log})"

    # -- the sharded model ----------------------------------------------------------------------------
    def share_weights(self, model: torch.nn.Module) -> None:
        """Before sharding: every rank takes rank 0's weights (a follower skips the warm start)."""
        self.barrier("built")  # every rank has built its model (rank 0's warm start may take minutes)
        with self.guard("sharing the initial weights"), torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2 over all ranks: every transformer block is its own unit (its parameters gathered only while it
        runs), the rest (embeddings, final norm, head) the root's; gradients are summed, not averaged."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        device = next(model.parameters()).device.type
        self.mesh = init_device_mesh(device, (self.world,))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
                for block in module:
                    fully_shard(block, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        for module in model.modules():
            if isinstance(module, FSDPModule):  # each rank's loss is its share of the global loss: sum them
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: plain sums

    def local_shards(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """This rank's shards of the trainable parameters (the root unit is first resharded: FSDP2 keeps it
        gathered after a forward)."""
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        return [p.detach().to_local() for p in model.parameters() if p.requires_grad]

    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """The unsharded model (and optimiser) state on rank 0, in the single-process format (the optimiser's
        parameters numbered in its own order, as ``Optimizer.state_dict`` does); empty dicts on the others."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=opts)
        optim_sd = None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts)
        if optim_sd is not None and self.leader:
            ids = {fqn: i for i, fqn in enumerate(_param_fqns(model, optimizer))}
            optim_sd = {"state": {ids[f]: v for f, v in optim_sd["state"].items()},
                        "param_groups": [{**g, "params": [ids[f] for f in g["params"]]}
                                         for g in optim_sd["param_groups"]]}
        return model_sd, optim_sd

    def load_full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        model_sd: dict[str, torch.Tensor] | None, optim_sd: dict[str, Any] | None) -> None:
        """Rank 0's single-process state dicts (any rank count wrote them) into the sharded model and optimiser;
        the other ranks pass None and receive their shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        if self.leader:
            fqns = _param_fqns(model, optimizer)
            optim_sd = {"state": {fqns[i]: v for i, v in optim_sd["state"].items()},
                        "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]}
                                         for g in optim_sd["param_groups"]]}
        set_model_state_dict(model, model_sd if self.leader else {}, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd if self.leader else {}, options=opts)

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Rank 0: stop the followers (a command, then SIGKILL after a grace period) and leave the group."""
        if self.leader:
            try:
                self.command(STOP)
            except Exception:  # the store lives in this process; a failure here leaves only the kill below
                pass
            deadline = time.monotonic() + 5.0  # an idle follower exits within a second
            for p in self.procs.values():
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()


def _collective_error(e: Exception) -> bool:
    """A failed or timed-out collective (gloo / nccl / the store), as opposed to an error in tether's own code."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(k in text for k in ("gloo", "Connection closed", "Timed out",
                                                                     "timed out", "NCCL", "Connection reset"))


def _param_fqns(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimiser's order (ids 0, 1, ... of ``Optimizer.state_dict``); a tied weight is
    named once, by its first name, as ``named_parameters`` does."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _backend() -> str:
    """gloo for CPU tensors, and nccl for CUDA tensors where a GPU is visible (one group, both backends)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def lead(cfg, run_dir: Path) -> Ranks:
    """Rank 0: start ranks 1..R-1 as child processes (each its own session, so a Ctrl-C reaches only rank 0,
    which stops them), or join an external launcher's group (torchrun-style RANK / WORLD_SIZE / MASTER_ADDR /
    MASTER_PORT in the environment: every node runs the same command). Returns this rank's :class:`Ranks`."""
    world, timeout_s = cfg.dist.trainer_ranks, cfg.dist.sync_timeout_s
    timeout = datetime.timedelta(seconds=timeout_s)
    external = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if external:
        if int(os.environ["WORLD_SIZE"]) != world:
            raise ValueError(f"config field 'trainer_ranks' is {world} but the launcher's WORLD_SIZE is "
                             f"{os.environ['WORLD_SIZE']}")
        # torchrun's agent already serves a store on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE): join it
        host = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=host,
                              wait_for_workers=False,
                              timeout=timeout)
        procs, logs = {}, {}
    else:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        logs = {r: run_dir / "ranks" / f"rank-{r}.log" for r in range(1, world)}
        procs = {r: _spawn(r, world, store.port, logs[r], timeout_s) for r in range(1, world)}
    ranks = Ranks(0, world, store, timeout_s, procs, logs)
    try:
        ranks.barrier("up")  # every rank has imported torch and reached the store
        with ranks.guard("starting the process group"):
            dist.init_process_group(_backend(), store=store, rank=0, world_size=world, timeout=timeout)
            dist.broadcast_object_list([(cfg, torch.get_default_dtype())], src=0)
    except BaseException:
        for p in procs.values():
            p.kill()
            p.wait()
        raise
    return ranks


def _spawn(rank: int, world: int, port: int, log: Path, timeout_s: float) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the tether package
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), LEADER_PID_ENV: str(os.getpid()), TIMEOUT_ENV: str(timeout_s),
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "tether.dist.ranks"], env=env, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _watch_leader(pid: int) -> None:
    """A follower started by rank 0 exits as soon as rank 0's process is gone (even SIGKILLed)."""
    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(70)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="tether-leader-watch").start()


def follow() -> None:
    """A follower's whole life (``python -m tether.dist.ranks``, or rank > 0 under an external launcher): join
    the group, receive the config, build the run and obey rank 0's commands until it says stop."""
    from tether.train.run import Run

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if LEADER_PID_ENV in os.environ:
        _watch_leader(int(os.environ[LEADER_PID_ENV]))
    timeout_s = float(os.environ.get(TIMEOUT_ENV, "120"))
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    Ranks(rank, world, store, timeout_s).barrier("up")
    dist.init_process_group(_backend(), store=store, rank=rank, world_size=world, timeout=timeout)
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    # a follower's weights are rank 0's (share_weights): it needs the architecture, not the warm start
    cfg, dtype = box[0]
    torch.set_default_dtype(dtype)  # the model is built as rank 0 built it (float64 in the parity tests)
    cfg = replace(cfg, warmstart_steps=0, resume=None, overwrite=False, progress=False)
    ranks = Ranks(rank, world, store, timeout_s)
    kill = os.environ.get(KILL_RANK_ENV, "").split(",")
    kill_at = (int(kill[0]), int(kill[1])) if len(kill) >= 2 else None
    how = signal.SIGSTOP if kill[2:] == ["hang"] else signal.SIGKILL
    try:
        with Run(cfg, ranks=ranks) as run:
            while True:
                name, payload = ranks.receive()
                if name == STOP:
                    return
                if name == "learn" and kill_at == (rank, payload.step):
                    os.kill(os.getpid(), how)
                run.follow(name, payload)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    follow()
