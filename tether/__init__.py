"""tether: KL-regularised reinforcement learning and preference optimisation for language models.

objective = reward − β·KL(π_θ ‖ π_ref), with the KL measured, controlled and trusted.
"""

__version__ = "0.1.0"
