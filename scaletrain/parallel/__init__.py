"""How the processes of a run are laid out: the launcher's environment and the process group
(environment.py)."""
