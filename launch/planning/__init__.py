"""What `python -m launch.plan` (launch/plan.py) is built from: the activation bytes a layout keeps
(`activations`) and its step-time estimate from stated hardware figures (`step_time`)."""
