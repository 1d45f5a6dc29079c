"""What a person sees of a run: rank 0's progress carried to the driver (``board``,
``monitor``), the console's bars, summaries and tables (``console``, ``bars``) and TensorBoard
event files (``tensorboard``)."""
