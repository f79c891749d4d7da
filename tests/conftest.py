import pytest
import torch
from onestep.teachers.gmm import GMMTeacher, four_component_mixture
from torch import nn

from onestep.student import AvgVelocityField


class ExactAvgVelocity(AvgVelocityField):
    """The exact average velocity of a GMM teacher (scipy solve_ivp, rtol 1e-10) as a 'student'."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))  # so .parameters() is not empty

    def forward(self, z, r, t, cond=None):
        return self.teacher.average_velocity(z, r, t, cond) + 0 * self.dummy


@pytest.fixture
def gmm_teacher():
    return GMMTeacher(four_component_mixture())


@pytest.fixture
def exact_field(gmm_teacher):
    return ExactAvgVelocity(gmm_teacher)
