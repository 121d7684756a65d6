"""repablate.nn -- the ground floor: re-parameterizable blocks and their exact fusion. Imports torch only."""

from repablate.nn.blocks import Conv, RepConv, RepConvN, autopad, make_activation
from repablate.nn.extensions import CrossRepConv, RepAttention, RepCrossModal, RepMobileBlock
from repablate.nn.qarep import QARepConv, QuantRepConv
from repablate.nn.reparam import (
    Equivalence,
    equivalence_error,
    is_deployed,
    load_state_dict,
    reparameterizable_modules,
    reparameterize,
)

__all__ = [
    "Conv",
    "CrossRepConv",
    "Equivalence",
    "QARepConv",
    "QuantRepConv",
    "RepAttention",
    "RepConv",
    "RepConvN",
    "RepCrossModal",
    "RepMobileBlock",
    "autopad",
    "equivalence_error",
    "is_deployed",
    "load_state_dict",
    "make_activation",
    "reparameterizable_modules",
    "reparameterize",
]
