"""Stage two: train side networks on the cache (fit, sweep), evaluate and predict with them; the baselines they are judged against."""
