# uart-cpl0-pv - static-PV twin of uart-cpl0: the console lines go into ring 0
# of minivmm's paravirtual ring device (no LSR polling). Same checksum as
# uart-cpl0 for the same iters. Needs the ring device (exits 2 without it).

        .set PV, 1
        .include "uart-cpl0.s"
