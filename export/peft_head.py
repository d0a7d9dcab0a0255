"""Head only: no encoder tensor is trainable; the classification head (added for seq-cls) is all of θ."""


def METHOD(model, spec, modules, options):
    return []
