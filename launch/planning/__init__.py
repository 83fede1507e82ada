"""What `python -m launch.plan` (launch/plan.py) is built from: the parameter counts (`params`), the memory
terms per GPU (`memory`), the activation bytes a layout keeps (`activations`) and its step-time estimate
from stated hardware figures (`step_time`)."""
