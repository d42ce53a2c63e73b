# doorbell-cpl3-pv - static-PV twin of doorbell-cpl3: requests go into ring 1
# of minivmm's paravirtual ring device; STATUS is still read once per batch
# (that read exits, and the VMM drains ring 1 first). Same checksum as
# doorbell-cpl3 for the same iters. Needs the doorbell and the ring device.

        .set PV, 1
        .include "doorbell-cpl3.s"
