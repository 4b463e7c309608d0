"""The privacy core: clipping rules, per-case gradients, the noisy step, accounting, Poisson sampling, adaptive clipping and noise schedules, step masks, the privacy report and audit."""
