"""Training objectives, registered by name in `onestep.registry.OBJECTIVES`."""
from onestep.objectives.base import Objective
from onestep.objectives.flow_matching import FlowMatching
from onestep.objectives.meanflow import MeanFlow
from onestep.objectives.splitmeanflow import SplitMeanFlow

__all__ = ["Objective", "FlowMatching", "MeanFlow", "SplitMeanFlow"]
