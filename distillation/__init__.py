"""Laughing Hyena distillation: any trained long filter (implicit, or an RTF of a higher order) fitted
by a small recurrence, the modal (pole-residue) form or the RTF (polynomial) form.

    hankel.py      the Hankel spectrum (what any order-k fit can reach) and the ERA starting points
    refine.py      batched Levenberg-Marquardt in pole-residue and in polynomial coordinates
    poles.py       pole radii, root clamping and the conditioning of an RTF's denominator
    fit.py         distill_modal / distill_filters: order choice, start, refinement, the fits
    checkpoint.py  a checkpoint folder in, a distilled checkpoint folder out (distill.py's pipeline)

Not part of the exported model code (models/): a distilled checkpoint needs only models/modal.py
or models/rtf.py to run.
"""
