"""Qt-free helpers of the USFMAE Slicer module.

- :mod:`USFMAELib.engine`: where ``usfmae_core`` lives (shipped beside the module or in the source checkout) and which
  Python packages it still needs;
- :mod:`USFMAELib.jobs`: long jobs (fine-tune, pretrain) in a child process: non-blocking output reading, progress
  lines, cancel of the whole process tree;
- :mod:`USFMAELib.logic`: the module's logic on the MRML scene (classify, reconstruct, model cache, job plans).

Nothing here imports Qt, and nothing imports torch at import time, so these modules load instantly and are tested
with pytest against the ``slicer-core`` package.
"""
