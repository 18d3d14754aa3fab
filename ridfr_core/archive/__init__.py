"""Whole archives: folders, globs, path lists and videos in, a mirrored output tree and a manifest out (issue 10).

- :mod:`.inputs`: what ``--lq`` names -> the files to restore and where each output goes.
- :mod:`.manifest`: one JSON line per input; resume skips what is done; per-process parts are merged.
- :mod:`.people`: ``--people DIR`` (one sub-folder of reference photos per person).
- :mod:`.tracking`: faces followed across video frames, one identity per track by a vote.
- :mod:`.video`: PyAV decode/encode that keeps the frame rate and remuxes the audio.
- :mod:`.restoring`: photos batched across files for the sampler, videos restored track by track.
- :mod:`.run`: the archive job of the CLI (checks, resume, progress, accelerate splitting, summary).
"""
