"""Training objectives, registered by name in `onestep.registry.OBJECTIVES`."""
from onestep.objectives.base import Objective
from onestep.objectives.fdistill import FDistill
from onestep.objectives.flow_matching import FlowMatching
from onestep.objectives.ladd import LADD, SCMLADD
from onestep.objectives.lightning import Lightning
from onestep.objectives.meanflow import MeanFlow
from onestep.objectives.rcm import RCM
from onestep.objectives.scm import SCM
from onestep.objectives.smt import SMD, SMT
from onestep.objectives.splitmeanflow import SplitMeanFlow

__all__ = ["Objective", "FDistill", "FlowMatching", "LADD", "Lightning", "MeanFlow", "RCM", "SCM", "SCMLADD", "SMD",
           "SMT", "SplitMeanFlow"]
