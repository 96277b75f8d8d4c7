"""``python -m streamkernel``: run an engine."""
from .engine import main_exit

main_exit()
