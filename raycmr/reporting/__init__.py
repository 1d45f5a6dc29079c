"""What a person sees of a run: rank 0's progress carried to the driver (``board``), the
console's bars, summaries and tables (``console``), the run's log file (``logfile``) and
TensorBoard event files (``tensorboard``)."""
