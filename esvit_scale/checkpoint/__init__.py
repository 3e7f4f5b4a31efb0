"""Checkpoints: where a run starts (restore.py), the folders it writes (store.py), their completion marker and
manifest (manifest.py), and safe reading and writing of the files (files.py)."""
from esvit_scale.checkpoint.files import CheckpointError, load_file, safe_torch_load  # noqa: F401
from esvit_scale.checkpoint.manifest import COMPLETE, read_marker  # noqa: F401
from esvit_scale.checkpoint.store import CheckpointStore, tag_for  # noqa: F401
