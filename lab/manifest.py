"""What a lab seeded, as plain frozen values that round-trip through JSON.

``python -m lab up`` prints these, ``lab.json`` in the lab folder keeps them, and
``Lab.load`` reads them back, so a test, a benchmark or a demo in another process knows
every name, id and path the lab created without asking Docker.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class SeededImage:
    name: str
    id: str
    layer_subvolumes: tuple[Path, ...]  # <data_root>/btrfs/subvolumes/<cache-id>, base first


@dataclass(frozen=True)
class SeededVolume:
    name: str
    mountpoint: Path  # <data_root>/volumes/<name>/_data
    labels: dict[str, str]
    anonymous: bool
    files: dict[str, str]  # relative path -> content written into it


@dataclass(frozen=True)
class SeededContainer:
    name: str
    id: str
    running: bool
    volume: str  # the volume it mounts at /data
    layer_subvolumes: tuple[Path, ...]  # its init layer and its own layer


@dataclass(frozen=True)
class NeverTouch:
    """Things a cleaner must leave alone, whatever it is asked."""

    keep_volume: SeededVolume  # labelled keep=true, holds data, used by nothing
    named_volume: SeededVolume  # named, holds data, used by nothing
    in_use_volume: SeededVolume  # mounted by the running container
    stopped_anonymous_volume: SeededVolume  # anonymous, of the stopped container
    running_container: SeededContainer  # busybox sleep
    stopped_container: SeededContainer  # exited, not removed
    images: tuple[SeededImage, ...]

    @property
    def volumes(self) -> tuple[SeededVolume, ...]:
        return (
            self.keep_volume,
            self.named_volume,
            self.in_use_volume,
            self.stopped_anonymous_volume,
        )

    @property
    def subvolumes(self) -> tuple[Path, ...]:
        """Every layer subvolume of the images and the two containers."""
        paths: list[Path] = []
        for image in self.images:
            paths.extend(image.layer_subvolumes)
        for c in (self.running_container, self.stopped_container):
            paths.extend(c.layer_subvolumes)
        return tuple(paths)


@dataclass(frozen=True)
class SeededDind:
    """A leaked docker-in-docker volume: anonymous, dangling, full of nested subvolumes."""

    volume: str  # the anonymous volume's name
    mountpoint: Path  # <data_root>/volumes/<volume>/_data
    container_name: str  # the dind container, now removed
    container_id: str
    inner_image_subvolumes: tuple[Path, ...]  # the inner daemon's image layers
    inner_container_subvolumes: tuple[Path, ...]  # inner containers' layers and -init layers
    ro_leaf: Path  # read-only, no subvolume below it (an inner image layer)
    ro_parent: Path  # read-only, holds ro_parent_child
    ro_parent_child: Path  # writable subvolume inside ro_parent
    inner_container_ids: tuple[str, ...]

    @property
    def subvolumes(self) -> tuple[Path, ...]:
        """All nested subvolumes, each parent before its children."""
        return (
            *self.inner_image_subvolumes,
            *self.inner_container_subvolumes,
            self.ro_parent,
            self.ro_parent_child,
        )

    @property
    def read_only(self) -> tuple[Path, ...]:
        return tuple(p for p in self.subvolumes if p in (self.ro_leaf, self.ro_parent))

    @property
    def writable(self) -> tuple[Path, ...]:
        return tuple(p for p in self.subvolumes if p not in (self.ro_leaf, self.ro_parent))


@dataclass(frozen=True)
class SeededOrphan:
    """A subvolume in the outer daemon's btrfs/subvolumes/ that no layer references."""

    name: str
    path: Path


@dataclass(frozen=True)
class Seeded:
    dind: SeededDind
    orphan: SeededOrphan
    never_touch: NeverTouch


def to_jsonable(value: Any) -> Any:
    """Dataclasses to dicts, paths to strings, tuples to lists (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value


def from_jsonable(cls: type[T], data: Any) -> T:
    """The inverse of ``to_jsonable`` for the dataclasses of this package."""
    return typing.cast(T, _decode(cls, data))


def _decode(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], data)
    if origin is tuple:
        return tuple(_decode(args[0], v) for v in data)
    if origin is list:
        return [_decode(args[0], v) for v in data]
    if origin is dict:
        return {_decode(args[0], k): _decode(args[1], v) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: _decode(hints[f.name], data[f.name]) for f in dataclasses.fields(tp)}
        return tp(**kwargs)
    if tp is Path:
        return Path(data)
    if tp in (str, int, float, bool):
        return tp(data)
    if tp is Any:
        return data
    raise TypeError(f"cannot decode {tp!r}")
