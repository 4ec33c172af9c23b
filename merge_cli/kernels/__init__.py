"""Fast CPU kernels, bitwise equal to the plain kernels in merge_cli/methods/.

- dispatch.py: the one dispatch table (FUSED_METHODS, `applies`, `whole`) and the linear /
  task_arithmetic runners; ties.py: TIES (exact thresholds from views of the tensor, then consensus);
  gta.py: dare_linear / dare_ties and breadcrumbs / breadcrumbs_ties; route.py: native or eager for one
  primitive, and which compute dtypes are served; choice.py: the report's kernels line.
- blocked.py: the eager blocked primitives (torch ops over ~1 MB blocks): sums, trims, consensus.
- native/: the same primitives in C (kernels.c, built at first use with the system compiler, loaded with
  ctypes); without a compiler the eager primitives run and give the same bits.

Each methods/NAME.py says in FAST_KERNELS which of these serve it (an empty tuple: the plain kernel only).
"""
