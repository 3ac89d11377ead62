//! Crate `nvmf`: NVMe/TCP wire formats, target and initiator (next issue).
