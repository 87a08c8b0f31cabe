"""Training: ``config`` (the job's options), ``engine`` (set-up, one step, one epoch, validation,
without Ray), ``distributed`` (the collectives between workers) and ``ray_trainer`` (the Ray Train
loop and the driver that launches it).
"""
