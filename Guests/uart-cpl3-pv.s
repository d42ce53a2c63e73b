# uart-cpl3-pv - static-PV twin of uart-cpl3: the console lines go into ring 0
# of minivmm's paravirtual ring device (no LSR polling); the rings are mapped
# user-accessible. Same checksum as uart-cpl3 for the same iters. Needs the
# ring device (exits 2 without it).

        .set PV, 1
        .include "uart-cpl3.s"
