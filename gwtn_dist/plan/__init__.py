"""What a run needs before it runs: ``gwtn plan`` (memory, communication and time per stage and
rank, from the config and a trace of the nets on the meta device) and ``gwtn rehearse`` (every
stage at true size for a few steps, with each rank's measured peak), and the check of one
against the other. See docs/plan.md."""
