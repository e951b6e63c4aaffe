from curvzo.optim import CurvZO, MeZO, ZOOptimizer
