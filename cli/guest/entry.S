/* Ferry demo guest entry. The host starts every vCPU here directly in 64-bit ring 3,
 * with RSP at the top of the vCPU's own stack and RDI holding the vCPU index. */
	.section .text.entry, "ax"
	.code64
	.globl _start
_start:
	xor %ebp, %ebp
	and $-16, %rsp
	call guest_main
1:	pause
	jmp 1b
