"""Eq. 7 prediction: argmax_c of softmax_c'(f[c'] + tau Delta_cc'(f[c'])), exactly, and fast.

The direct computation is a C x C sum per pixel and tau. Four modules make it cheap without
changing a single prediction:

- `kernel`: the direct computation itself, in log space, block by block (TorchScript compatible:
  `blda export` scripts it, so `--apply` and the exported module run the same code), and the
  table interpolation of the offsets Delta (`gather_offsets`).
- `pruning`: per-column bound tables lo <= Delta <= hi (`bound_tables`), and the drivers
  `predict_pruned` (one tau) and `predict_taus` (a sweep) that send only the pixels the
  certificate leaves undecided to `kernel`.
- `certify`: the certificate. From the bounds, each class's Eq. 7 score has an upper bound U_c
  and a lower bound L_c that hold for a whole range of taus at once, so a class with
  U_c < max L cannot win; a pixel left with one candidate is decided without the C x C sum.
- `steps`: the certificate's numba steps (two bound steps of increasing cost, then float64
  scores of the remaining candidates at a single tau), each deciding what the previous left.

Why it is exact: bounds and scores are formed in float64 with a margin larger than the float32
error of the direct computation, so the direct computation's winner (lowest index on ties) is
never ruled out; what no step decides (exact ties, overflow) goes to `kernel`. The margin
argument is written out in `certify`'s docstring.
"""
