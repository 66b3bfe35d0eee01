# qdirtier.s: rewrites a working set of 4 KiB pages continuously and prints its progress on COM1.
#
# Command line (QEMU -append): pages=W  working set in pages (default 1024; capped at the memory above
#                                       WS_BASE = 4 MiB; 0 is an error)
#                              every=K  print a line every K rounds (default max(1, 1048576 / W), about a
#                                       million page writes per line)
#                              ring=0   run the loop at CPL0 instead of CPL3 (see rt.s)
# Output: "qdirtier: running at CPL3", "qdirtier: pages=W every=K", then "round K", "round 2K", ...
#
# Round r (r = 1, 2, ...) writes, in every page p = 0 .. W-1 of the working set (page p at 4 MiB + 4096 p),
# two little-endian u32 words: word 0 = p, and word 1 + (r mod 1023) = r (low 32 bits). So after a round
# every page of the working set is dirty, and no page outside it is ever written.

    .code32
    .globl main, guest_name

    .set WS_BASE, 0x400000

    .section .text
main:
    movl $key_pages, %esi
    movl $1024, %eax
    call arg_dec
    testl %eax, %eax
    jz fatal_arg
    movl %eax, %ebp                     # W
    movl mem_top, %eax
    cmpl $WS_BASE + 4096, %eax
    jb no_memory
    subl $WS_BASE, %eax
    shrl $12, %eax                      # pages available
    cmpl %eax, %ebp
    jbe 1f
    movl %eax, %ebp
    movl $msg_capped, %esi
    xorl %edx, %edx
    call put_line
1:  movl %ebp, pages

    movl $0x100000, %eax                # default every = max(1, 2^20 / W)
    xorl %edx, %edx
    divl %ebp
    testl %eax, %eax
    jnz 2f
    incl %eax
2:  movl $key_every, %esi
    call arg_dec
    testl %eax, %eax
    jz fatal_arg
    movl %eax, every

    movl $msg_pages, %esi
    call puts
    movl pages, %eax
    call put_dec32
    movl $msg_every, %esi
    call puts
    movl every, %eax
    call put_dec32
    movb $'\n', %al
    call putc

    movl every, %eax
    movl %eax, countdown
.Lround:
    addl $1, round
    adcl $0, round + 4
    movl round, %ebx                    # r (low 32 bits)
    movl %ebx, %eax
    xorl %edx, %edx
    movl $1023, %ecx
    divl %ecx
    leal 4(,%edx,4), %esi               # byte offset of word 1 + (r mod 1023)
    addl $WS_BASE, %esi
    movl $WS_BASE, %edi
    xorl %ecx, %ecx                     # p
.Lpage:
    movl %ecx, (%edi)
    movl %ebx, (%esi)
    addl $4096, %edi
    addl $4096, %esi
    incl %ecx
    cmpl %ebp, %ecx
    jb .Lpage
    decl countdown
    jnz .Lround
    movl every, %eax
    movl %eax, countdown
    movl $msg_round, %esi
    movl round, %eax
    movl round + 4, %edx
    call put_line
    jmp .Lround

no_memory:
    movl $msg_no_memory, %esi
    jmp fatal

    .section .rodata
guest_name:     .asciz "qdirtier"
key_pages:      .asciz "pages"
key_every:      .asciz "every"
msg_capped:     .asciz "qdirtier: pages capped to the memory above 4 MiB: "
msg_pages:      .asciz "qdirtier: pages="
msg_every:      .asciz " every="
msg_round:      .asciz "round "
msg_no_memory:  .asciz "no memory above 4 MiB for the working set (give QEMU -m 8 or more)"

    .section .bss
    .balign 8
round:      .skip 8
pages:      .skip 4
every:      .skip 4
countdown:  .skip 4
