"""File names: of a Hugging Face checkpoint directory, and of barber-stream's output directory.

A leaf module of constants (no imports), so that the reader (`barber.checkpoint`), the writer, the
resume state and `barber.output`, which owns the output directory, share one spelling of each.
See `barber.output` for what the output names mean.
"""

#: The weights of an unsharded checkpoint.
SINGLE_FILE = "model.safetensors"
#: The tensor name -> shard file map of a sharded checkpoint.
INDEX_FILE = "model.safetensors.index.json"

#: barber-stream keeps its work (and resume state) in this directory of its output while running,
#: and writes REPORT_FILE last: a directory with the first and without the second is unfinished.
WORK_DIR = ".barber-work"
REPORT_FILE = "barber_report.json"
#: The report for people, beside REPORT_FILE (`barber.report_view`).
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
#: In WORK_DIR: the resume state, the output staged before it is renamed into place, and the pruned
#: linears of finished block i (``BLOCK_FILE.format(i=i)``).
STATE_FILE = "state.safetensors"
STAGE_DIR = "final"
BLOCK_FILE = "block-{i:05d}.safetensors"
