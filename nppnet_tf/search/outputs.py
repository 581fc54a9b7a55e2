"""The files a search writes besides its checkpoints (docs/search.md).

```
<out>/genotype.json architecture.npz          the last epoch's
<out>/best_genotype.json best_architecture.npz best.json
<out>/epochs/<epoch>/genotype.json architecture.npz metrics.json
                     architecture_weights.png diagrams/<field>.svg|png
```

Every file is written to a temporary name and renamed, so a kill never
leaves half a file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nppnet_tf.search import architecture_file, draw
from nppnet_tf.search.genotype import Genotype


def epoch_dir(out_dir: Path, epoch: int) -> Path:
    """`<out>/epochs/<epoch>`, zero-padded (`000`, `001`, ...)."""
    return Path(out_dir) / "epochs" / f"{epoch:03d}"


def write_epoch(
    out_dir: Path,
    epoch: int,
    arrays: Mapping[str, np.ndarray],
    genotype: Genotype,
    base_genotype: Genotype | None,
    record: Mapping[str, Any],
) -> Path:
    """Writes one epoch's architecture, genotype, drawings and metrics.

    Returns:
        The epoch directory.
    """
    directory = epoch_dir(out_dir, epoch)
    architecture_file.save_architecture(
        directory / "architecture.npz", arrays, base_genotype
    )
    genotype.save(directory / "genotype.json")
    draw.draw_genotype(genotype, directory / "diagrams")
    draw.plot_architecture_weights(
        arrays, directory / "architecture_weights.png"
    )
    write_json(directory / "metrics.json", {"epoch": epoch, **record})
    return directory


def publish(
    out_dir: Path, directory: Path, best: Mapping[str, Any] | None
) -> None:
    """Copies an epoch's genotype and architecture to the top level, and to
    `best_*` (with `best` as `best.json`) when it is the new best."""
    out_dir = Path(out_dir)
    copy_file(directory / "genotype.json", out_dir / "genotype.json")
    copy_file(directory / "architecture.npz", out_dir / "architecture.npz")
    if best is not None:
        copy_file(directory / "genotype.json", out_dir / "best_genotype.json")
        copy_file(
            directory / "architecture.npz", out_dir / "best_architecture.npz"
        )
        write_json(out_dir / "best.json", dict(best))


def restore_best(
    out_dir: Path, genotype: Genotype | None, best: Mapping[str, Any]
) -> None:
    """Makes the `best_*` files agree with a restored checkpoint's best (a
    kill may have come between writing them and saving the checkpoint)."""
    out_dir = Path(out_dir)
    if genotype is None:
        for name in (
            "best_genotype.json",
            "best_architecture.npz",
            "best.json",
        ):
            (out_dir / name).unlink(missing_ok=True)
        return
    genotype.save(out_dir / "best_genotype.json")
    source = epoch_dir(out_dir, int(best["epoch"])) / "architecture.npz"
    if source.exists():
        copy_file(source, out_dir / "best_architecture.npz")
    write_json(out_dir / "best.json", dict(best))


def write_current(
    out_dir: Path,
    arrays: Mapping[str, np.ndarray],
    genotype: Genotype,
    base_genotype: Genotype | None,
) -> None:
    """`genotype.json` and `architecture.npz` of the current parameters."""
    architecture_file.save_architecture(
        Path(out_dir) / "architecture.npz", arrays, base_genotype
    )
    genotype.save(Path(out_dir) / "genotype.json")


def copy_file(source: Path, target: Path) -> None:
    """Copies `source` to `target` through a temporary file."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Sorted, indented JSON through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps(data, indent=2, sort_keys=True, default=_plain) + "\n"
    )
    tmp.replace(path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
