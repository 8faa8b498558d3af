"""Deploy and Rollback: a signed bundle into a capsule, all or nothing.

Order (as every handler here): the bundle is decoded and verified first (size cap, framing,
signature against the trusted keys, then the manifest: capsuled.bundle), which tells the
signer and the version; the one `ctx.authorize` line (org.capsuled.deploy, detail `signer`,
verb deploy / downgrade / rollback) comes next; then the work under the capsule's lock.

"All or nothing" (docs/BUNDLE.md, "Deploying"): before anything changes, every entry the call
will write or remove in the capsule's home is recorded (safefs snapshots: the bytes and mode of
a file, the target of a link, or that nothing was there), and so is which of the units concerned
are running. Anything planted in the way (a symlink on a path, a hardlinked or special file, a
directory where a file goes) refuses the call at that point, before any write. Then:

1. the capsule is started if it was not running (its manager must run to start units);
2. the units the new version drops are stopped;
3. files and links are written (each atomically, through safefs);
4. the manager is reloaded, and each `enable` unit is (re)started, in order (its failed state
   and start rate limit cleared first, as `systemctl reset-failed` does: a deploy is a
   deliberate start, and a few in a row must not trip the limit).

If any step fails, everything is put back from the records: the files and links, the units
that ran (restarted on their old files) or did not (stopped), and a capsule we started is
stopped again; the error (DeployFailed, or UnsafeCapsuleHome for a write refused half-way) says
so. A start that systemd reports as done counts as started (as for StartUnit): a Type=simple
unit that crashes a second later is not seen; Type=exec/notify units give systemd more to go
on. The work runs to its end (success or rollback) even if the client hangs up meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import posixpath
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from capsuled import bundle as fmt
from capsuled import errors, wire
from capsuled.audit import RESULT_FAILED, RESULT_OK, AuditAction
from capsuled.deployments import CorruptDeployment, Deployed, Deployment
from capsuled.methods import params
from capsuled.methods.context import CallContext, backend_errors
from capsuled.methods.inside import CAPSULE_HOME_IN_CAPSULE, UNIT_DIR, WANTS_DIR, in_home
from capsuled.methods.lifecycle import describe_wire
from capsuled.policy import actions as act
from capsuled.policy.signers import TrustedKeys
from capsuled.safefs import (
    FILE_MODE,
    CapsuleHome,
    EntryKind,
    EntrySnapshot,
    SafeFsError,
    UnsafePath,
)
from capsuled.systemd import errors as sd

log = logging.getLogger(__name__)

# The base64 text of a bundle at the cap: checked before decoding anything.
MAX_BUNDLE_BASE64_CHARS = 4 * ((fmt.MAX_BUNDLE_BYTES + 2) // 3)
VERB_DEPLOY = "deploy"
VERB_DOWNGRADE = "downgrade"
VERB_ROLLBACK = "rollback"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Verified:
    """A bundle whose signature a trusted key verified, and its parsed manifest."""

    data: bytes
    bundle: fmt.Bundle
    signer: str
    key_id: str
    sha256: str


def decode(text: str) -> bytes:
    """The bundle's bytes from the Deploy parameter (strict base64), within the cap.

    Raises:
        InvalidBundle: over the cap, or not base64.
    """
    if len(text) > MAX_BUNDLE_BASE64_CHARS:
        raise errors.InvalidBundle(reason=f"larger than {fmt.MAX_BUNDLE_BYTES} bytes", path=None)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidBundle(reason="the bundle parameter is not base64", path=None) from None


def verify(data: bytes, keys: TrustedKeys) -> Verified:
    """Framing, signature (before the manifest is parsed), then the manifest; blocking (a
    worker thread runs it: SHA-256 of up to 512 KiB, and the first use imports cryptography).

    Raises:
        InvalidBundle, UnsignedBundle, UntrustedSigner, BadSignature: the wire errors.
    """
    try:
        envelope = fmt.open_envelope(data)
        kid = fmt.verify_signature(envelope, keys.verifying_keys())
        parsed = fmt.read_manifest(envelope)
    except fmt.InvalidBundle as exc:
        raise errors.InvalidBundle(reason=exc.reason, path=exc.path) from None
    except fmt.Unsigned:
        raise errors.UnsignedBundle() from None
    except fmt.UntrustedKey as exc:
        raise errors.UntrustedSigner(keyId=exc.key_id) from None
    except fmt.BadSignature as exc:
        raise errors.BadSignature(keyId=exc.key_id) from None
    return Verified(data, parsed, keys.signer_of(kid), kid.hex(), hashlib.sha256(data).hexdigest())


# -- what a version puts into a home ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Place:
    """One entry under the home: a directory (tuple of names) and a name."""

    rel_dir: tuple[str, ...]
    name: str

    @property
    def key(self) -> str:
        return "/".join((*self.rel_dir, self.name))

    @classmethod
    def of_key(cls, key: str) -> Place:
        parts = tuple(key.split("/"))
        return cls(parts[:-1], parts[-1])


def _file_places(parsed: fmt.Bundle) -> dict[str, tuple[Place, bytes, int]]:
    """key -> (place, content, mode) of every file the version puts into the home."""
    out: dict[str, tuple[Place, bytes, int]] = {}
    for unit, entry in parsed.units.items():
        place = Place(UNIT_DIR, unit)
        out[place.key] = (place, entry.data, FILE_MODE)
    for entry in parsed.files:
        home_path = entry.home_path
        assert home_path is not None  # files is the entries that have one
        place = Place(home_path[:-1], home_path[-1])
        out[place.key] = (place, entry.data, entry.mode)
    return out


def _unit_of(key: str) -> str | None:
    place = Place.of_key(key)
    return place.name if place.rel_dir == UNIT_DIR else None


@dataclass(slots=True)
class Plan:
    """What putting a version in place changes, and what it was before (the snapshots)."""

    capsule: str
    writes: dict[str, tuple[Place, bytes, int]]
    removes: list[Place]
    links: list[str]  # units to link into capsule@.target.wants
    unlinks: list[str]
    enable: tuple[str, ...]
    dropped_units: list[str]  # units of the old version(s) the new one lacks
    snapshots: list[EntrySnapshot] = field(default_factory=list)
    touched: list[EntrySnapshot] = field(default_factory=list)  # what apply() began to change

    @classmethod
    def build(cls, capsule: str, parsed: fmt.Bundle, old: Iterable[Deployed]) -> Plan:
        writes = _file_places(parsed)
        old_paths = {p for d in old for p in d.paths}
        old_enable = {u for d in old for u in d.enable}
        removes = [Place.of_key(k) for k in sorted(old_paths - set(writes))]
        dropped = sorted(u for k in old_paths - set(writes) if (u := _unit_of(k)) is not None)
        return cls(
            capsule,
            writes,
            removes,
            links=list(parsed.enable),
            unlinks=sorted(old_enable - set(parsed.enable)),
            enable=parsed.enable,
            dropped_units=dropped,
        )

    def places(self) -> list[Place]:
        """Every entry the plan touches."""
        files = [p for p, _, _ in self.writes.values()] + self.removes
        links = [Place(WANTS_DIR, u) for u in (*self.links, *self.unlinks)]
        return files + links

    def units(self) -> set[str]:
        """Every unit whose file or link the plan touches."""
        named = {u for k in self.writes if (u := _unit_of(k)) is not None}
        return named | set(self.dropped_units) | set(self.links) | set(self.unlinks)

    # -- in a worker thread (CapsuleHomes.run) ------------------------------------------------

    def take_snapshots(self, home: CapsuleHome) -> None:
        # The cap: a file the capsule made bigger than any bundle could write back is refused.
        self.snapshots = [
            home.snapshot_entry(p.rel_dir, p.name, fmt.MAX_BUNDLE_BYTES) for p in self.places()
        ]
        for snap in self.snapshots:
            # Refused now rather than by the write half-way: a symlink where a file goes, or
            # anything but a symlink where a link goes.
            link_place = snap.rel_dir == WANTS_DIR
            if snap.kind is EntryKind.SYMLINK and not link_place:
                raise UnsafePath(home.path_of([*snap.rel_dir, snap.name]), "is a symlink")
            if snap.kind is EntryKind.FILE and link_place:
                raise UnsafePath(home.path_of([*snap.rel_dir, snap.name]), "is not a symlink")

    def apply(self, home: CapsuleHome) -> None:
        """Write the new version; on any failure put back what was touched, then re-raise.

        Raises:
            SafeFsError: a write was refused; everything it touched was put back.
            _RestoreFailed: a write was refused, and putting things back failed too.
        """
        recorded = {(s.rel_dir, s.name): s for s in self.snapshots}

        def touching(rel_dir: tuple[str, ...], name: str) -> None:
            # Before the write: a write refused half-way may have made directories already.
            self.touched.append(recorded[(rel_dir, name)])

        try:
            for place, data, mode in self.writes.values():
                touching(place.rel_dir, place.name)
                home.write_file_atomically(place.rel_dir, place.name, data, mode)
            for place in self.removes:
                touching(place.rel_dir, place.name)
                home.remove_file(place.rel_dir, place.name)
            for unit in self.unlinks:
                touching(WANTS_DIR, unit)
                home.remove_file(WANTS_DIR, unit)
            for unit in self.links:
                touching(WANTS_DIR, unit)
                target = posixpath.join(CAPSULE_HOME_IN_CAPSULE, self.capsule, *UNIT_DIR, unit)
                home.symlink(WANTS_DIR, unit, target)
        except SafeFsError as first:
            try:
                self.restore(home)
            except SafeFsError as again:
                raise _RestoreFailed(first, again) from first
            raise

    def restore(self, home: CapsuleHome) -> None:
        """Every entry apply() touched as it was, last first (links before the files they
        name). Each is tried even if an earlier one fails: as much as can be is put back.

        Raises:
            SafeFsError: the first entry that could not be put back.
        """
        failed: SafeFsError | None = None
        for snapshot in reversed(self.touched):
            try:
                home.restore_entry(snapshot)
            except SafeFsError as exc:
                if snapshot.kind is None and _refused_before_writing(home, snapshot):
                    continue  # nothing was there and nothing could be written: as it was
                log.error("cannot put %s back: %s", exc.path, exc.reason)
                failed = failed or exc
        if failed is not None:
            raise failed


def _refused_before_writing(home: CapsuleHome, snapshot: EntrySnapshot) -> bool:
    """True if the entry's directory cannot be reached safely any more: the capsule planted a
    link on the way. No write of ours went through that link (safefs never follows one), and
    what we may have written before the capsule moved things is still inside its home, which
    we do not chase it into: for the host, nothing of ours is left to take back."""
    try:
        os.close(home.open_dir(snapshot.rel_dir, create=False))
    except SafeFsError:
        return True
    return False


# -- the handlers ---------------------------------------------------------------------------


def deploy_verb(current: Deployed | None, version: str) -> str:
    """downgrade when `version` is lower than the current one's, else deploy."""
    if current is not None and fmt.compare_versions(version, current.version) < 0:
        return VERB_DOWNGRADE
    return VERB_DEPLOY


def _state(ctx: CallContext, name: str) -> Deployment:
    try:
        return ctx.services.deployments.get(name)
    except CorruptDeployment as exc:
        log.error("deployment state of %s refused: %s", name, exc)
        raise errors.InternalError() from exc


async def deploy(ctx: CallContext, p: wire.DeployParams) -> wire.DeployReply:
    name = params.capsule_name(p["name"])
    data = decode(p["bundle"])
    keys = ctx.services.authorizer.trusted_keys
    new = await asyncio.to_thread(verify, data, keys)
    verb = deploy_verb(_state(ctx, name).current, new.bundle.version)
    interactive = p["allowInteractiveAuthentication"]
    await ctx.authorize(act.DEPLOY, name, interactive=interactive, verb=verb, signer=new.signer)
    await ctx.require_systemd()
    async with ctx.locked(name):
        state = _state(ctx, name)
        again = deploy_verb(state.current, new.bundle.version)
        if again != verb:
            # Another Deploy finished while we waited for the lock: decide on what is now.
            verb = again
            await ctx.authorize(
                act.DEPLOY, name, interactive=interactive, verb=verb, signer=new.signer
            )
        if verb == VERB_DOWNGRADE and not p["allowDowngrade"]:
            assert state.current is not None  # deploy_verb said so
            refused = errors.DowngradeRefused(
                current=state.current.version, version=new.bundle.version
            )
            ctx.audit(
                AuditAction.DEPLOY,
                name,
                refused.name,
                version=new.bundle.version,
                current_version=state.current.version,
                signer=new.signer,
            )
            raise refused
        return await _put_in_place(ctx, name, new, state, kept=state.current, verb=verb)


async def rollback(ctx: CallContext, p: wire.CapsuleParams) -> wire.DeployReply:
    name = params.capsule_name(p["name"])
    interactive = p["allowInteractiveAuthentication"]
    state = _state(ctx, name)
    # The signer of the kept version, as the trusted keys of now say (None: nothing kept, or no
    # longer trusted): the policy decides on it before we say which.
    kept = await _verified_kept(ctx, name, state)
    signer = kept.signer if isinstance(kept, Verified) else None
    await ctx.authorize(
        act.DEPLOY, name, interactive=interactive, verb=VERB_ROLLBACK, signer=signer
    )
    await ctx.require_systemd()
    async with ctx.locked(name):
        state = _state(ctx, name)
        kept = await _verified_kept(ctx, name, state)
        if isinstance(kept, errors.ManagerError):
            raise kept
        if kept.signer != signer:
            await ctx.authorize(
                act.DEPLOY, name, interactive=interactive, verb=VERB_ROLLBACK, signer=kept.signer
            )
        return await _put_in_place(ctx, name, kept, state, kept=state.current, verb=VERB_ROLLBACK)


async def _verified_kept(
    ctx: CallContext, name: str, state: Deployment
) -> Verified | errors.ManagerError:
    """The kept (previous) version, verified again; or the error a Rollback answers."""
    previous = state.previous
    if previous is None:
        return errors.NoPreviousBundle(name=name)
    try:
        data = ctx.services.deployments.load_bundle(name, previous.sha256)
    except CorruptDeployment as exc:
        log.error("kept bundle of %s refused: %s", name, exc)
        return errors.InternalError()
    try:
        return await asyncio.to_thread(verify, data, ctx.services.authorizer.trusted_keys)
    except errors.ManagerError as exc:
        return exc


async def _put_in_place(
    ctx: CallContext,
    name: str,
    new: Verified,
    state: Deployment,
    *,
    kept: Deployed | None,
    verb: str,
) -> wire.DeployReply:
    info = await ctx.existing(name, ctx.record_of(name))
    old = [d for d in (state.current, state.pending) if d is not None]
    plan = Plan.build(name, new.bundle, old)
    deployed = Deployed(
        name=new.bundle.name,
        version=new.bundle.version,
        signer=new.signer,
        key_id=new.key_id,
        sha256=new.sha256,
        deployed_usec=time.time_ns() // 1000,
        deployed_by=ctx.peer.uid,
        paths=tuple(sorted(plan.writes)),
        enable=plan.enable,
    )
    audit = AuditAction.ROLLBACK if verb == VERB_ROLLBACK else AuditAction.DEPLOY
    details = {
        "bundle": new.bundle.name,
        "version": new.bundle.version,
        "signer": new.signer,
        "key_id": new.key_id,
        "sha256": new.sha256,
        "verb": verb,
        "previous_version": state.current.version if state.current else None,
    }
    change = _Change(ctx, name, plan, was_running=info is not None and info.state == "active")
    try:
        # Runs to its end (done or put back) even if the caller hangs up meanwhile.
        started = await _unless_cancelled(change.run(ctx, new, state, deployed))
    except errors.DeployFailed as failure:
        ctx.audit(audit, name, RESULT_FAILED, unit=str(failure.parameters.get("unit")), **details)
        raise
    ctx.services.deployments.put(name, state.finish(deployed, kept))
    ctx.audit(audit, name, RESULT_OK, started=" ".join(started), **details)
    capsule = await describe_wire(ctx, name)
    bundle = capsule["bundle"]
    assert bundle is not None  # just recorded
    return {"capsule": capsule, "deployed": bundle, "started": started}


async def _unless_cancelled(work: Awaitable[T]) -> T:
    """Await `work` in a task of its own that a cancelled caller waits for (as safefs's
    CapsuleHomes.run does): a half-done deploy must finish or be put back."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                continue
        if not task.cancelled():
            task.exception()  # retrieved: nobody is left to see it
        raise


@dataclass(slots=True)
class _Change:
    """One Deploy/Rollback at work: what it did so far, so that it can be undone."""

    ctx: CallContext
    name: str
    plan: Plan
    was_running: bool
    running_before: set[str] = field(default_factory=set)
    touched: list[str] = field(default_factory=list)  # units we stopped, started or restarted
    # False once putting things back failed: the home may hold parts of both versions, and the
    # pending mark stays for Describe (unfinishedVersion) and the next Deploy.
    consistent: bool = True

    async def run(
        self, ctx: CallContext, new: Verified, state: Deployment, deployed: Deployed
    ) -> list[str]:
        """Put the new version in place, or everything back; the units (re)started."""
        if not self.was_running:
            with backend_errors(self.name):
                await ctx.backend.start(self.name)
        deployments = ctx.services.deployments
        try:
            await in_home(ctx, self.name, self.plan.take_snapshots)
            self.running_before = await self._running_units()
            # Before the home changes: a helper killed from here on leaves the pending mark.
            deployments.store_bundle(self.name, new.sha256, new.data)
            deployments.put(self.name, state.begin(deployed))
        except BaseException:
            await self._stop_if_we_started()
            raise
        try:
            return await self._switch()
        except BaseException:
            if self.consistent:
                deployments.put(self.name, state)
            raise

    async def _switch(self) -> list[str]:
        step = ""  # the unit being worked on ("" while it is the manager itself)
        started: list[str] = []
        try:
            async with self.ctx.backend.capsule_manager(self.name) as mgr:
                for unit in self.plan.dropped_units:
                    if unit in self.running_before:
                        step = unit
                        self.touched.append(unit)
                        await mgr.stop_unit(unit)
                step = ""
                await self._write_files()
                await mgr.reload()
                for unit in self.plan.enable:
                    step = unit
                    self.touched.append(unit)
                    # A new version is a deliberate start: like `systemctl reset-failed`, clear
                    # a failed state and the start rate limit (five starts in ten seconds),
                    # which a few quick deploys in a row would otherwise hit.
                    await mgr.reset_failed_unit(unit)
                    await mgr.restart_unit(unit)
                    started.append(unit)
        except sd.BackendError as exc:
            await self._undo(step, exc)
        except _FilesRefused as refused:
            # apply() put the files back (or says it could not); the units go back too.
            self.consistent = refused.restored
            await self._undo_units()
            await self._stop_if_we_started()
            raise refused.error from None
        return started

    async def _write_files(self) -> None:
        try:
            await self.ctx.services.homes.run(self.name, self.plan.apply)
        except _RestoreFailed as exc:
            log.error("deploy into %s: cannot put the files back: %s", self.name, exc)
            raise _FilesRefused(_unsafe(self.name, exc.first), restored=False) from exc
        except SafeFsError as exc:
            raise _FilesRefused(_unsafe(self.name, exc), restored=True) from exc

    async def _running_units(self) -> set[str]:
        units = self.plan.units()
        with backend_errors(self.name):
            async with self.ctx.backend.capsule_manager(self.name) as mgr:
                return {
                    u.name
                    for u in await mgr.list_units()
                    if u.name in units and u.active_state in ("active", "activating", "reloading")
                }

    async def _undo(self, unit: str, cause: sd.BackendError) -> None:
        """Put files, links and units back; raise DeployFailed saying how that went."""
        log.warning("deploy into %s failed at %r (%s); putting it back", self.name, unit, cause)
        try:
            await self.ctx.services.homes.run(self.name, self.plan.restore)
        except SafeFsError:
            log.exception("deploy into %s: cannot put the files back", self.name)
            self.consistent = False
        if not await self._undo_units():
            self.consistent = False
        await self._stop_if_we_started()
        result, unit_result = "error", None
        if isinstance(cause, sd.JobFailed):
            result, unit_result = cause.result, cause.unit_result
        current = _state(self.ctx, self.name).current
        raise errors.DeployFailed(
            unit=unit,
            result=result,
            unitResult=unit_result,
            restoredVersion=current.version if current is not None else None,
            rolledBack=self.consistent,
        )

    async def _undo_units(self) -> bool:
        """Each unit we touched as it was: stopped if it did not run, reload, restarted (on its
        old file) if it ran. False if any of that failed (logged)."""
        try:
            async with self.ctx.backend.capsule_manager(self.name) as mgr:
                ok = True
                for unit in dict.fromkeys(reversed(self.touched)):
                    if unit not in self.running_before:
                        ok = await _quietly(mgr.stop_unit(unit)) and ok
                        await _quietly(mgr.reset_failed_unit(unit))
                await mgr.reload()
                for unit in dict.fromkeys(self.touched):
                    if unit in self.running_before:
                        # The deploy's own restarts count against the start rate limit too.
                        await _quietly(mgr.reset_failed_unit(unit))
                        ok = await _quietly(mgr.restart_unit(unit)) and ok
                return ok
        except sd.BackendError:
            log.exception("deploy into %s: cannot put the units back", self.name)
            return False

    async def _stop_if_we_started(self) -> None:
        if self.was_running:
            return
        try:
            await self.ctx.backend.stop(self.name)
        except sd.BackendError:
            log.exception("cannot stop %s again after a refused deploy", self.name)
            self.consistent = False


class _FilesRefused(Exception):
    """Writing the new version's files failed (safefs); `restored`: they were put back."""

    def __init__(self, error: errors.UnsafeCapsuleHome, *, restored: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.restored = restored


class _RestoreFailed(SafeFsError):
    """Putting the files back after a refused write failed too; `first` is what was refused."""

    def __init__(self, first: SafeFsError, again: SafeFsError) -> None:
        super().__init__(again.path, again.reason)
        self.first = first


def _unsafe(name: str, exc: SafeFsError) -> errors.UnsafeCapsuleHome:
    return errors.UnsafeCapsuleHome(name=name, path=exc.path, reason=exc.reason)


async def _quietly(call: Awaitable[object]) -> bool:
    """A best-effort step of putting things back: False (logged) if it failed."""
    try:
        await call
    except sd.BackendError as exc:
        log.warning("while putting a deploy back: %s", exc)
        return False
    return True
