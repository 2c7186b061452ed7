"""Compute kernels of onelayer_fast, installed as `onelayer_fast.kernels`.

Each op lives in `kernels/<op>.py` next to its plain-PyTorch reference `<op>_ref`. The kernels know
nothing of models or trainers: they take tensors and return tensors.
"""
