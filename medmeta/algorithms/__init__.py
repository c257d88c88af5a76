"""Meta-learning algorithms: functional, parameters in, loss or logits out."""

from medmeta.algorithms.maml import MAML
from medmeta.algorithms.pixel_nn import pixel_nearest_neighbour

__all__ = ["MAML", "pixel_nearest_neighbour"]
