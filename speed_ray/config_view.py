"""A read-recording view of a typed config: what a stage's fingerprint must cover is what the stage reads.

    rec = Recorder()
    view = ConfigView(cfg, rec)          # what a running stage gets as ctx.cfg (speed_ray.pipeline.run_stage)
    view.teacher.judge_temperature       # -> 0.0, and rec.paths == {"teacher.judge_temperature"}

Transparent to the stage code: a dataclass section comes back as a view of its own (recording under its dotted
path), anything else as the plain value, and only such leaves are recorded (looking a section up reads nothing).
`isinstance(view, TeacherConfig)`, `dataclasses.is_dataclass/fields/asdict` and `speed_ray.config.to_dict` work on
a view; the last two read, so record, every leaf of the section (comparing and hashing a view record nothing).
`dataclasses.replace(view, ...)` works too and returns a plain config, so it records every field it copies;
`replace` below keeps the result a view and records only what is read from it. Views are frozen like the configs
they show; a method or property of the config class runs with the view as `self`, so its reads are recorded.

Crossing a process (Ray tasks, actors, Ray Data UDFs pickle the config they capture): a view whose recorder has a
`sink` (a local directory) arrives as a view that appends its new paths to a file in that directory, one per
process, and `Recorder.all_paths()` collects them; the tests set one. Without a sink a view arrives as the plain
config, and only the driver's reads are recorded. Pass a config to Ray Data as a UDF's constructor argument through
`for_workers`: Ray Data exports its operators' arguments as metadata with dataclasses.asdict, which would read them all.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import threading
import uuid
from typing import Any

__all__ = ["ConfigView", "Recorder", "for_workers", "replace", "unwrap"]


class Recorder:
    """The dotted paths read through the views that share it (thread-safe: concurrent stages, async actors)."""

    def __init__(self, sink: str | None = None):
        self.paths: set[str] = set()
        self.sink = sink                # a local directory: views pickled to other processes record there
        self._lock = threading.Lock()
        self._file: str | None = None   # set in a process that unpickled a view: where its reads go

    def add(self, path: str) -> None:
        if path in self.paths:
            return
        with self._lock:
            if path in self.paths:
                return
            self.paths.add(path)
            if self._file:
                try:
                    with open(self._file, "a") as f:
                        f.write(path + "\n")
                except OSError:     # recording never fails the stage it watches
                    pass

    def all_paths(self) -> set[str]:
        """This process's paths and those the sink received from other processes."""
        paths = set(self.paths)
        if self.sink and os.path.isdir(self.sink):
            for name in os.listdir(self.sink):
                if name.endswith(".reads"):
                    with open(os.path.join(self.sink, name)) as f:
                        paths.update(line.strip() for line in f if line.strip())
        return paths


_REMOTE: dict[str, Recorder] = {}       # per process: one recorder per sink
_REMOTE_LOCK = threading.Lock()


def _remote_recorder(sink: str) -> Recorder:
    with _REMOTE_LOCK:
        rec = _REMOTE.get(sink)
        if rec is None:
            rec = _REMOTE[sink] = Recorder(sink)
            rec._file = os.path.join(sink, f"{os.getpid()}-{uuid.uuid4().hex[:8]}.reads")
            try:
                os.makedirs(sink, exist_ok=True)
            except OSError:
                pass
        return rec


def _remote_view(obj: Any, path: str, sink: str) -> "ConfigView":
    return ConfigView(obj, _remote_recorder(sink), path)


def _plain(obj: Any) -> Any:
    return obj


class ConfigView:
    """A frozen dataclass config seen through a Recorder; see the module docstring."""

    __slots__ = ("_cv_obj", "_cv_rec", "_cv_path")

    def __init__(self, obj: Any, recorder: Recorder, path: str = ""):
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            raise TypeError(f"ConfigView needs a dataclass instance, got {type(obj).__name__}")
        object.__setattr__(self, "_cv_obj", unwrap(obj))
        object.__setattr__(self, "_cv_rec", recorder)
        object.__setattr__(self, "_cv_path", path)

    # --- what makes it pass for its config ---------------------------------------------------------------------
    @property
    def __class__(self):                        # isinstance(view, TeacherConfig)
        return type(self._cv_obj)

    @property
    def __dataclass_fields__(self):             # dataclasses.is_dataclass / fields / asdict / replace
        return self._cv_obj.__dataclass_fields__

    def __getattr__(self, name: str) -> Any:    # only names not found on the view itself
        obj = object.__getattribute__(self, "_cv_obj")
        if name in obj.__dataclass_fields__:
            return _child(self, name, getattr(obj, name))
        attr = inspect.getattr_static(type(obj), name, None)
        if inspect.isfunction(attr):            # a config method: bound to the view, so its reads are recorded
            return attr.__get__(self)
        if isinstance(attr, property) and attr.fget is not None:
            return attr.fget(self)
        return getattr(obj, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __dir__(self):
        return dir(self._cv_obj)

    def __repr__(self) -> str:                  # logging a config is not reading it
        return repr(self._cv_obj)

    # Comparing or hashing is not reading: Ray Data hashes (and may compare) UDF constructor arguments as cache
    # keys, which would count every field as read.
    def __eq__(self, other: Any) -> bool:
        return self._cv_obj == unwrap(other)

    def __hash__(self) -> int:
        return hash(self._cv_obj)

    def __copy__(self) -> "ConfigView":
        return self

    def __deepcopy__(self, memo: dict) -> "ConfigView":
        return self                             # frozen: sharing is a copy

    def __reduce_ex__(self, protocol: int):
        sink = self._cv_rec.sink
        if sink:
            return _remote_view, (self._cv_obj, self._cv_path, sink)
        return _plain, (self._cv_obj,)

    def __reduce__(self):
        return self.__reduce_ex__(2)


def _child(view: ConfigView, name: str, value: Any) -> Any:
    path = f"{view._cv_path}.{name}" if view._cv_path else name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ConfigView(value, view._cv_rec, path)
    view._cv_rec.add(path)
    return value


def unwrap(obj: Any) -> Any:
    """The plain config behind a view (reads nothing); anything else as is."""
    while type(obj) is ConfigView:
        obj = object.__getattribute__(obj, "_cv_obj")
    return obj


def for_workers(obj: Any) -> Any:
    """What to hand Ray as a UDF's constructor argument: reads of it in this process are not recorded (Ray Data's
    metadata export reads every field of its operators' arguments), the workers' are when the recorder has a sink.
    Without one, the plain config."""
    if type(obj) is not ConfigView:
        return obj
    sink = obj._cv_rec.sink
    return ConfigView(obj._cv_obj, Recorder(sink), obj._cv_path) if sink else obj._cv_obj


def replace(obj: Any, /, **changes: Any) -> Any:
    """dataclasses.replace that keeps a view a view (same recorder and path) and reads only what `changes` does not
    replace when those fields are read later; a plain config gets plain dataclasses.replace."""
    if type(obj) is ConfigView:
        return ConfigView(dataclasses.replace(obj._cv_obj, **{k: unwrap(v) for k, v in changes.items()}),
                          obj._cv_rec, obj._cv_path)
    return dataclasses.replace(obj, **changes)

