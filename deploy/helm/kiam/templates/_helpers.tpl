{{- define "kiam.labels" -}}
app.kubernetes.io/part-of: kiam
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "kiam.serverHost" -}}
kiam-server.{{ .Release.Namespace }}.svc.cluster.local
{{- end -}}
