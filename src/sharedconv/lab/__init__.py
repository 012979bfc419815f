"""The book's instruments: what the chapters measure and draw the layers with.

Nothing in the layers of ``sharedconv`` imports this subpackage; it is imported by the book,
the tests and the benchmark programs.

- :mod:`sharedconv.lab.baselines`: the other ways people compute a shared convolution
  (a loop over groups, the lift to a higher-dimensional convolution, grouped convolutions
  on copies of the bank, ``torch.vmap``, sum-then-convolve), each checked against the fold;
- :mod:`sharedconv.lab.memory`: exact counts of a step's FLOPs, bytes moved, bytes saved
  for the backward and peak bytes, through dispatch modes and saved-tensor hooks;
- :mod:`sharedconv.lab.bench` (``python -m sharedconv.lab.bench``): timings as ratios
  measured in one run, written as JSON naming the machine;
- :mod:`sharedconv.lab.roofline` (``python -m sharedconv.lab.roofline``): the machine's
  roof and each approach's step placed under it;
- :mod:`sharedconv.lab.diagrams`: figures drawn from a real layer's configuration
  (needs matplotlib: ``pip install 'sharedconv[diagrams]'``);
- :mod:`sharedconv.lab.ranking`: the ranking case study's data, models and training loop;
- :mod:`sharedconv.lab.tf32`: TF32's operand rounding emulated on any device, to check that
  what a chapter asserts about trained models holds on a GPU's TF32 arithmetic.

The stored runs that the chapters plot ship in ``sharedconv/lab/results/``.
"""

__all__ = ["baselines", "bench", "diagrams", "memory", "ranking", "roofline", "tf32"]
