import sys, time; sys.path.insert(0, 'tests')
import logging; logging.basicConfig(level=logging.INFO)
from helpers_age import synthetic_cmd
from reduction.age import fit_age
for age, mh, k in [(9.33, -0.3, 1.0), (8.52, -0.2, 1.07)]:
    cat = synthetic_cmd(age, 1000, mh=mh, distance_modulus=10.3, ebv=0.2, zeropoint=(-3.7, 0.3), color_scale=k, rng=11)
    t = time.perf_counter()
    f = fit_age(cat['color'], cat['mag'], cat['color_err'], cat['mag_err'], cat['usable'])
    print(age, mh, k, '->', round(f.log_age,3), f.statistical, f.mh, f.mh_low, f.mh_high, f.color_scale, time.perf_counter() - t)
    print(len(f.profile_lnl), [round(v,1) for v in f.profile_lnl[max(0,int((age-6.6)/0.05)-8):int((age-6.6)/0.05)+9]])
