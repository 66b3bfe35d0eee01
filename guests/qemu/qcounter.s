# qcounter.s: prints an increasing counter on COM1, one line per `every` iterations of work.
#
# Command line (QEMU -append): every=N  iterations between two lines (default 1000000; 0 is an error)
#                              ring=0   run the loop at CPL0 instead of CPL3 (see rt.s)
# Output: "qcounter: running at CPL3", "qcounter: every=N", then "count 1", "count 2", ... forever.
#
# One iteration i (i = 0, 1, 2, ..., 32 bits, wrapping) updates word i mod 64 of a 64-word array:
# w = rol(w, 5) xor (i * 0x9E3779B9), and adds w to a running checksum. The lines depend only on the
# memory state, never on time.

    .code32
    .globl main, guest_name

    .section .text
main:
    movl $key_every, %esi
    movl $1000000, %eax
    call arg_dec
    testl %eax, %eax
    jz fatal_arg
    movl %eax, %ebp                     # iterations per line
    movl $msg_every, %esi
    xorl %edx, %edx
    call put_line

    movl iteration, %ebx
.Lline:
    movl %ebp, %ecx
    movl checksum, %edi
.Lwork:
    movl %ebx, %esi
    andl $63, %esi
    movl work(,%esi,4), %edx
    roll $5, %edx
    imull $0x9E3779B9, %ebx, %eax
    xorl %eax, %edx
    movl %edx, work(,%esi,4)
    addl %edx, %edi
    incl %ebx
    decl %ecx
    jnz .Lwork
    movl %edi, checksum
    movl %ebx, iteration

    addl $1, count
    adcl $0, count + 4
    movl $msg_count, %esi
    movl count, %eax
    movl count + 4, %edx
    call put_line
    jmp .Lline

    .section .rodata
guest_name: .asciz "qcounter"
key_every:  .asciz "every"
msg_every:  .asciz "qcounter: every="
msg_count:  .asciz "count "

    .section .bss
    .balign 64
work:       .skip 64 * 4
count:      .skip 8                     # lines printed (u64)
iteration:  .skip 4
checksum:   .skip 4
